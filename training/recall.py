"""The upstream recall stage that the reranker reorders: item-kNN and ALS.

Both return, for a history, the top N unseen item rows with their scores, best first.
Ties are broken by item row so that lists are reproducible.
"""

from __future__ import annotations

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


def top_n(scores: np.ndarray, seen: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``n`` columns of each row of ``scores`` (B, n_items + 1) outside ``seen`` (bool)."""
    scores = np.where(seen, -np.inf, scores)
    scores[:, 0] = -np.inf  # padding
    n = min(n, scores.shape[1] - 1)
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]  # (B, n) unordered
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)  # score desc, then row asc
    items = np.take_along_axis(part, order, axis=1)
    return items, np.take_along_axis(part_scores, order, axis=1)


class ItemKNN:
    """Cosine similarity of items on the binary user-item matrix of the training split."""

    name = "item-knn"

    def __init__(self, train: list[np.ndarray], n_items: int) -> None:
        x = user_item_matrix(train, n_items)
        self.co = (x.T @ x).toarray().astype(np.float32)  # (I+1, I+1) co-occurrence counts
        self.count = np.diag(self.co).copy()  # (I+1,) users per item
        norm = np.sqrt(np.maximum(self.count, 1.0))
        self.sim = self.co / norm[:, None] / norm[None, :]
        np.fill_diagonal(self.sim, 0.0)
        self.n_items = n_items

    def recall(self, histories: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-n unseen items per history: (B, n) item rows and their summed similarity."""
        h = user_item_matrix(histories, self.n_items)
        scores = np.asarray(h @ self.sim)  # (B, I+1)
        return top_n(scores, h.toarray() > 0, n)

    def sim_without_user(self, rows: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Similarity of items ``rows`` (of the user) to every item, with the user's own
        interactions taken out of the columns' counts: (len(rows), I+1).

        A training list at position t of a user's sequence must not see that the user went
        on to watch its candidates; at test time the target is absent from the training
        data in the same way. ``own`` (I+1,) is 1.0 for the items of the user's sequence.
        """
        co = self.co[rows] - own[None, :]  # the user's own row adds 1 to every own pair
        denom = (
            np.sqrt(np.maximum(self.count[rows], 1.0))[:, None]
            * np.sqrt(np.maximum(self.count - own, 1.0))[None, :]
        )
        sim = np.maximum(co, 0.0) / denom
        sim[np.arange(len(rows)), rows] = 0.0
        return sim

    def prefix_recall(self, seq: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Recall lists for every prefix ``seq[:t]``, t = start..len(seq)-1: (T, n) each,
        scored as if the user's later items were not in the training data."""
        own = np.zeros(self.n_items + 1, dtype=np.float32)
        own[seq] = 1.0
        rows = self.sim_without_user(seq, own)  # (len, I+1)
        cum = np.cumsum(rows, axis=0)[start - 1 : len(seq) - 1]  # prefix sums, (T, I+1)
        seen = np.zeros_like(cum, dtype=bool)
        for j, t in enumerate(range(start, len(seq))):
            seen[j, seq[:t]] = True
        return top_n(cum, seen, n)


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
