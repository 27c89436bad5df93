"""The upstream recall stage that the reranker reorders: item-kNN and ALS.

Both return, for a history, the top N unseen item rows with their scores, best first.
Ties are broken by item row so that lists are reproducible.

Nothing here holds a dense items x items matrix: item-kNN's co-occurrence counts and
similarities are scipy.sparse matrices, at most ``ItemKNN.max_nonzeros`` entries, and
top-N lists are taken over the columns a batch of rows actually scores (``sparse_top_n``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits


def user_item_matrix(histories: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """Binary (n_users, n_items + 1) matrix; column 0 is padding and stays empty."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.zeros(0, dtype=np.int64)
    data = np.ones(len(cols), dtype=np.float32)
    m = sp.csr_matrix((data, (rows, cols)), shape=(len(histories), n_items + 1))
    m.data[:] = 1.0  # repeated interactions count once
    return m


def seen_mask(histories: list[np.ndarray], n_cols: int) -> np.ndarray:
    """(B, n_cols) bool: True at each history's items."""
    mask = np.zeros((len(histories), n_cols), dtype=bool)
    for r, h in enumerate(histories):
        mask[r, h] = True
    return mask


def by_chunks(
    histories: list[np.ndarray],
    chunk: int,
    recall_part: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """``recall_part`` over ``chunk`` histories at a time (its (chunk, items) products stay
    that small), the (B, n) item rows and scores stacked."""
    items, scores = [], []
    for s in range(0, max(len(histories), 1), chunk):
        i, sc = recall_part(histories[s : s + chunk])
        items.append(i)
        scores.append(sc)
    return np.concatenate(items), np.concatenate(scores)


def top_n(scores: np.ndarray, seen: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``n`` columns of each row of ``scores`` (B, n_items + 1) outside ``seen`` (bool),
    by score descending, then row ascending, also where ties straddle the ``n``-th place."""
    scores = np.where(seen, -np.inf, scores)
    scores[:, 0] = -np.inf  # padding
    n = min(n, scores.shape[1] - 1)
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]  # (B, n) unordered
    part_scores = np.take_along_axis(scores, part, axis=1)
    # argpartition picks any of the items tied at the n-th score: take the lowest rows.
    last = part_scores.min(axis=1, keepdims=True)
    straddle = (scores == last).sum(axis=1) > (part_scores == last).sum(axis=1)
    for b in np.flatnonzero(straddle):
        above = np.flatnonzero(scores[b] > last[b])
        tied = np.flatnonzero(scores[b] == last[b])[: n - len(above)]
        part[b] = np.concatenate([above, tied])
        part_scores[b] = scores[b, part[b]]
    order = np.lexsort((part, -part_scores), axis=1)  # score desc, then row asc
    items = np.take_along_axis(part, order, axis=1)
    return items, np.take_along_axis(part_scores, order, axis=1)


def _fillers(n_cols: int, count: int, prior: np.ndarray | None) -> np.ndarray:
    """The first ``count`` item rows (padding row 0 excluded) in the order of ``prior``
    (descending, ties by row); by row without a prior."""
    count = min(count, n_cols - 1)
    if prior is None:
        return np.arange(1, count + 1)
    order = np.lexsort((np.arange(1, n_cols), -prior[1:]))[:count]
    return order + 1


def sparse_top_n(
    scores: sp.csr_matrix,
    histories: list[np.ndarray],
    n: int,
    prior: np.ndarray | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """``top_n(scores.toarray() + prior, seen, n)`` without the dense (B, n_items + 1)
    matrix: the same items and scores, for ``scores`` >= 0 (B, n_items + 1), the seen items
    of ``histories`` and an optional ``prior`` (n_items + 1,) added to every row.

    Each row's candidates are its stored entries and the first ``n + longest history``
    items in the prior's order (by row without one), its seen items out. An item outside
    them scores exactly its prior; at least ``n`` unseen candidates score at least as much
    and come first on ties, so it is never in the top ``n``. The candidates are ranked
    by one sort of (row, score desc, item row asc).
    """
    scores = sp.csr_matrix(scores)
    n_cols = scores.shape[1]
    items_out, scores_out = [], []
    for s in range(0, max(scores.shape[0], 1), chunk):
        part = scores[s : s + chunk]
        hist = histories[s : s + chunk]
        b = part.shape[0]
        longest = max((len(h) for h in hist), default=0)
        seen = [np.asarray(h, dtype=np.int64) for h in hist]
        # A small catalogue, or rows that reach an eighth of it: the dense form is small,
        # or a partition of it is faster than sorting that many entries.
        if n + longest + 1 >= n_cols or part.nnz * 8 > b * n_cols:
            dense = part.toarray() if prior is None else part.toarray() + prior[None, :]
            idx, sc = top_n(dense, seen_mask(seen, n_cols), n)
            items_out.append(idx)
            scores_out.append(sc)
            continue
        fill = _fillers(n_cols, n + longest, prior)
        rows = np.concatenate([np.repeat(np.arange(b), np.diff(part.indptr)),
                               np.repeat(np.arange(b), len(fill))])  # fmt: skip
        cols = np.concatenate([part.indices, np.tile(fill, b)]).astype(np.int64)
        vals = np.concatenate([part.data, np.zeros(b * len(fill), dtype=part.dtype)])
        filler = np.arange(len(rows)) >= part.nnz
        keys = rows * n_cols + cols
        order = np.lexsort((filler, keys))  # per item: a stored entry before its filler
        first = np.ones(len(order), dtype=bool)
        first[1:] = keys[order[1:]] != keys[order[:-1]]
        pick = order[first]
        seen_keys = np.concatenate([r * n_cols + h for r, h in enumerate(seen)] or [[]])
        pick = pick[(cols[pick] > 0) & ~np.isin(keys[pick], seen_keys)]
        rows, cols, vals = rows[pick], cols[pick], vals[pick]
        if prior is not None:
            vals = vals + prior[cols]
        order = np.lexsort((cols, -vals, rows))  # per row: score desc, then item row asc
        rows, cols, vals = rows[order], cols[order], vals[order]
        starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=b))[:-1]])
        place = np.arange(len(rows)) - starts[rows]
        top = place < n
        items = np.zeros((b, n), dtype=np.int64)
        best = np.zeros((b, n), dtype=vals.dtype)
        items[rows[top], place[top]] = cols[top]
        best[rows[top], place[top]] = vals[top]
        items_out.append(items)
        scores_out.append(best)
    return np.concatenate(items_out), np.concatenate(scores_out)


class PairLookup:
    """Values of a sparse matrix at broadcast index arrays, ``lookup[rows, cols]``, as a
    dense array of the broadcast shape (what fancy indexing of a dense matrix gives).

    A matrix of up to ``dense_max`` rows and columns is also kept dense, for speed (64 MB
    of float32 at most); a larger one is looked up in its sparse form only.
    """

    dense_max = 4096

    def __init__(self, m: sp.spmatrix) -> None:
        self.m = sp.csr_matrix(m)
        self.m.sum_duplicates()
        self.shape = self.m.shape
        self._dense = self.m.toarray() if max(self.shape) <= self.dense_max else None

    def __getitem__(self, index: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        if self._dense is not None:
            return self._dense[index]
        rows, cols = np.broadcast_arrays(*index)
        out = self.m[rows.ravel(), cols.ravel()]
        return np.asarray(out, dtype=self.m.dtype).reshape(rows.shape)

    def toarray(self) -> np.ndarray:
        return self.m.toarray()


def _keep_top(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Each row's ``k`` largest entries (ties by column) of a CSR matrix."""
    lengths = np.diff(m.indptr)
    if lengths.max(initial=0) <= k:
        return m
    rows = np.repeat(np.arange(m.shape[0]), lengths)
    order = np.lexsort((m.indices, -m.data, rows))  # by row, value desc, column asc
    rank = np.arange(len(order)) - np.repeat(m.indptr[:-1], lengths)
    keep = np.sort(order[rank < k])
    out = sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)
    out.sort_indices()
    return out


class ItemKNN:
    """Cosine similarity of items on the binary user-item matrix of the training split.

    ``co`` (I+1, I+1) co-occurrence counts and ``sim`` the cosine similarities, diagonal
    out, both sparse. Where the similarities would pass ``max_nonzeros`` entries, each item
    keeps its ``max_nonzeros // (I+1)`` most similar items (ties by row) and ``co`` the same
    entries and its diagonal; under it, both are exact.
    """

    name = "item-knn"
    max_nonzeros = 30_000_000  # 240 MB of float32 values and int32 columns per matrix
    block = 4096  # item rows of the co-occurrence product made at a time

    def __init__(self, train: list[np.ndarray], n_items: int) -> None:
        x = user_item_matrix(train, n_items)
        size = n_items + 1
        self.neighbours = max(1, self.max_nonzeros // size)
        xt = sp.csr_matrix(x.T)
        self.count = np.asarray(x.sum(axis=0), dtype=np.float32).ravel()  # (I+1,) users per item
        norm = np.sqrt(np.maximum(self.count, 1.0))
        co_parts, sim_parts = [], []
        for s in range(0, size, self.block):
            co = sp.csr_matrix(xt[s : s + self.block] @ x, dtype=np.float32)  # (blk, I+1)
            co.sum_duplicates()
            co.sort_indices()
            rows = s + np.repeat(np.arange(co.shape[0]), np.diff(co.indptr))
            # The dense recipe's operations, in its order: the same float32 values.
            sim = sp.csr_matrix(
                (co.data / norm[rows] / norm[co.indices], co.indices.copy(), co.indptr.copy()),
                shape=co.shape,
            )
            sim.data[rows == co.indices] = 0.0
            sim.eliminate_zeros()
            kept = _keep_top(sim, self.neighbours)
            if kept is not sim:  # co keeps the same entries, and its diagonal
                mask = kept.copy()
                mask.data[:] = 1.0
                mask = mask + sp.csr_matrix(
                    (np.ones(len(co.indptr) - 1, np.float32),
                     (np.arange(len(co.indptr) - 1), s + np.arange(len(co.indptr) - 1))),
                    shape=co.shape,
                )  # fmt: skip
                co = sp.csr_matrix(co.multiply(mask))
                co.sort_indices()
                sim = kept
            co_parts.append(co)
            sim_parts.append(sim)
        self.co = PairLookup(sp.vstack(co_parts, format="csr"))
        self.sim = sp.vstack(sim_parts, format="csr")
        self.sim.sort_indices()
        self.n_items = n_items

    def recall(
        self, histories: list[np.ndarray], n: int, chunk: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n unseen items per history: (B, n) item rows and their summed similarity."""

        def part(hist: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            h = user_item_matrix(hist, self.n_items)
            return sparse_top_n(sp.csr_matrix(h @ self.sim), hist, n, chunk=chunk)

        return by_chunks(histories, chunk, part)

    def sim_without_user(self, rows: np.ndarray, own: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Similarity of items ``rows`` (of the user) to items ``cols``, with the user's own
        interactions taken out of the columns' counts: (len(rows), len(cols)).

        A training list at position t of a user's sequence must not see that the user went
        on to watch its candidates; at test time the target is absent from the training
        data in the same way. ``own`` (len(cols),) is 1.0 for the items of the user's
        sequence.
        """
        co = self.co.m[rows][:, cols].toarray() - own[None, :]  # own pairs count 1 less
        denom = (
            np.sqrt(np.maximum(self.count[rows], 1.0))[:, None]
            * np.sqrt(np.maximum(self.count[cols] - own, 1.0))[None, :]
        )
        sim = np.maximum(co, 0.0) / denom
        sim[rows[:, None] == cols[None, :]] = 0.0
        return sim

    def prefix_recall(self, seq: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Recall lists for every prefix ``seq[:t]``, t = start..len(seq)-1: (T, n) each,
        scored as if the user's later items were not in the training data.

        Only the columns the sequence's items co-occur with, the sequence and the first
        ``n + len(seq)`` item rows are scored: every other item scores 0, as do at least
        ``n`` unseen items of lower row in the scored set (see ``sparse_top_n``)."""
        sub = self.co.m[seq]
        cols = np.union1d(np.concatenate([[0], sub.indices, seq]).astype(np.int64),
                          _fillers(self.n_items + 1, n + len(seq), None))  # fmt: skip
        own = np.isin(cols, seq).astype(np.float32)
        rows = self.sim_without_user(seq, own, cols)  # (len, C)
        cum = np.cumsum(rows, axis=0)[start - 1 : len(seq) - 1]  # prefix sums, (T, C)
        seen = np.zeros_like(cum, dtype=bool)
        at = np.searchsorted(cols, seq)
        for j, t in enumerate(range(start, len(seq))):
            seen[j, at[:t]] = True
        idx, scores = top_n(cum, seen, n)
        return cols[idx], scores


class ALSRecall:
    """Implicit-feedback matrix factorisation (the ``implicit`` library's ALS)."""

    name = "als"

    def __init__(
        self, train: list[np.ndarray], n_items: int, factors: int = 64, seed: int = 0
    ) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        # implicit runs its own threads; a BLAS thread pool underneath them oversubscribes.
        self._one_blas_thread = partial(threadpool_limits, 1, "blas")
        self.n_items = n_items
        with self._one_blas_thread():
            self.model = AlternatingLeastSquares(
                factors=factors, regularization=0.05, alpha=2.0, iterations=20,
                random_state=seed, num_threads=2,
            )  # fmt: skip
            self.model.fit(user_item_matrix(train, n_items), show_progress=False)

    def recall(self, histories: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        h = user_item_matrix(histories, self.n_items)
        users = np.arange(len(histories))
        with self._one_blas_thread():
            items, scores = self.model.recommend(
                users, h, N=n, filter_already_liked_items=True, filter_items=np.array([0]),
                recalculate_user=True,
            )  # fmt: skip
        return items.astype(np.int64), scores


def recall_at(lists: np.ndarray, targets: np.ndarray) -> float:
    """Share of users whose target item is anywhere in their list."""
    return float((lists == targets[:, None]).any(axis=1).mean())
