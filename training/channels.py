"""Recall channels beyond item-kNN and ALS: EASE over recency-weighted histories and Markov
transitions from the last items. The sequential channel is in ``training/sasrec.py``.

Every channel is fitted on the training split only and answers
``recall(histories, n) -> (items (B, n), scores (B, n))``: item rows best first, the user's
past items and the padding row 0 left out, ties broken by item row (``training.recall.top_n``).
"""

from __future__ import annotations

import sys
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from training.recall import by_chunks, sparse_top_n, top_n


class Channel(Protocol):
    """What fusion needs from a recall source (ItemKNN and ALSRecall are channels too)."""

    name: str

    def recall(self, histories: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]: ...


def recency(length: int, decay: float) -> np.ndarray:
    """(length,) weights of a time-ordered history: the newest item 1.0, each older one
    ``decay`` times the next newer one. ``decay=1.0`` weighs every item alike."""
    return decay ** np.arange(length - 1, -1, -1, dtype=np.float64)


def weighted_matrix(
    histories: list[np.ndarray], n_items: int, decay: float, last: int | None = None
) -> sp.csr_matrix:
    """(B, n_items + 1) recency-weighted histories; only the ``last`` newest items if given.
    An item that occurs twice keeps its newest (largest) weight."""
    rows, cols, vals = [], [], []
    for b, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)
        if last is not None:
            h = h[-last:]
        w = recency(len(h), decay)
        # np.unique keeps the first occurrence: reverse so that the newest one wins.
        items, first = np.unique(h[::-1], return_index=True)
        rows.append(np.full(len(items), b))
        cols.append(items)
        vals.append(w[::-1][first])
    if not histories:
        return sp.csr_matrix((0, n_items + 1))
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(histories), n_items + 1),
    )


def popularity(train: list[np.ndarray], n_items: int) -> np.ndarray:
    """(n_items + 1,) users per item in the training split; the padding row 0 counts 0."""
    count = np.bincount(np.concatenate(train), minlength=n_items + 1).astype(np.float64)
    count[0] = 0.0
    return count


class EASE:
    """EASE (Steck, "Embarrassingly Shallow Autoencoders", 2019) over recency-weighted rows.

    X is the (users, items) matrix of training histories, each user's row weighted by
    ``recency(len, decay)``; ``P = (X^T X + lam I)^-1`` and ``B = I - P / diag(P)`` (column
    j divided by P_jj), so diag(B) = 0. A query history is weighted the same way and
    scored by ``x @ B``.

    Cost: B is a dense items x items matrix and the inverse is O(items^3). At MovieLens-100K's
    1,682 items that is 11 MB and a fraction of a second; at 50,000 items it would be 10 GB
    in float32 (20 GB while inverting in float64) and about 1e14 floating-point operations,
    hours on two cores. Past ``max_items`` items, EASE is fitted on the ``max_items`` most
    popular ones (ties by row; 0.8 GB and about a minute at 10,000), says so on stderr, and
    recalls only those; a history's other items do not count.
    """

    name = "ease"
    max_items = 10_000

    def __init__(
        self, train: list[np.ndarray], n_items: int, lam: float = 200.0, decay: float = 1.0
    ) -> None:
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.n_items, self.lam, self.decay = n_items, lam, decay
        # The item rows EASE covers, ascending, padding row 0 first: columns of x and b.
        self.cols = np.arange(n_items + 1)
        if n_items > self.max_items:
            pop = popularity(train, n_items)[1:]
            top = np.lexsort((np.arange(n_items), -pop))[: self.max_items] + 1
            self.cols = np.concatenate([[0], np.sort(top)])
            share = pop[top - 1].sum() / max(pop.sum(), 1.0)
            print(
                f"ease: {n_items} items is past its dense limit of {self.max_items}; fitted "
                f"on the {self.max_items} most popular ({share:.0%} of the training "
                "interactions), the only items it recalls",
                file=sys.stderr,
            )
        x = weighted_matrix(train, n_items, decay)[:, self.cols[1:]]  # (U, K), no padding
        g = (x.T @ x).toarray().astype(np.float64)  # (K, K)
        g[np.diag_indices_from(g)] += lam
        p = np.linalg.inv(g)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        size = len(self.cols)
        self.b = np.zeros((size, size), dtype=np.float32)  # row/column 0: padding
        self.b[1:, 1:] = b

    def recall(self, histories: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        x = weighted_matrix(histories, self.n_items, self.decay)[:, self.cols]
        scores = np.asarray(x @ self.b, dtype=np.float64)  # (B, K+1)
        seen = np.zeros(scores.shape, dtype=bool)  # the history's items that EASE covers
        for b, h in enumerate(histories):
            at = np.searchsorted(self.cols, h).clip(max=len(self.cols) - 1)
            seen[b, at[self.cols[at] == h]] = True
        items, sc = top_n(scores, seen, n)
        return self.cols[items], sc


class Markov:
    """Item -> next item transitions from the last few items of a history.

    Fit: for every pair (a, b) where b follows a within ``window`` steps of a training
    sequence, add ``gap_decay ** (steps - 1)``; each row a is divided by its total to the
    power ``alpha`` (1.0: transition probabilities). Query: the last ``last`` items, the
    newest weighted 1.0 and each older one ``query_decay`` times the next, summed over
    their rows. A popularity share times 1e-6 breaks ties, so that items no transition
    reaches come in popularity order.

    Everything is a scipy.sparse matrix (nonzeros <= window x interactions); the top-N
    lists are taken over the items each query reaches (``sparse_top_n``).
    """

    name = "markov"

    def __init__(
        self,
        train: list[np.ndarray],
        n_items: int,
        window: int = 3,
        gap_decay: float = 0.5,
        alpha: float = 1.0,
        last: int = 5,
        query_decay: float = 0.5,
    ) -> None:
        if window < 1 or last < 1:
            raise ValueError(f"window and last must be >= 1, got {window} and {last}")
        self.n_items, self.last, self.query_decay = n_items, last, query_decay
        src, dst, val = [], [], []
        for seq in train:
            for step in range(1, min(window, len(seq) - 1) + 1):
                src.append(seq[:-step])
                dst.append(seq[step:])
                val.append(np.full(len(seq) - step, gap_decay ** (step - 1)))
        size = n_items + 1
        if src:
            t = sp.csr_matrix(
                (np.concatenate(val), (np.concatenate(src), np.concatenate(dst))),
                shape=(size, size),
            )  # duplicates are summed
        else:
            t = sp.csr_matrix((size, size))
        total = np.asarray(t.sum(axis=1)).ravel()
        scale = np.where(total > 0, np.maximum(total, 1e-12) ** -alpha, 0.0)
        self.t = sp.csr_matrix(sp.diags(scale) @ t)  # (I+1, I+1)
        pop = popularity(train, n_items) if train else np.zeros(size)
        self.prior = 1e-6 * pop / max(pop.sum(), 1.0)  # (I+1,)

    def recall(
        self, histories: list[np.ndarray], n: int, chunk: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:

        def part(hist: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            q = weighted_matrix(hist, self.n_items, self.query_decay, last=self.last)
            return sparse_top_n(sp.csr_matrix(q @ self.t), hist, n, self.prior, chunk)

        return by_chunks(histories, chunk, part)
