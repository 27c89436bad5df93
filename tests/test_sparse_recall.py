"""Item-kNN, the item features and the channels in sparse form give what their dense
recipes give: the same lists, the same similarities, the same transition weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import synthetic_split
from training.channels import weighted_matrix
from training.recall import ItemKNN, PairLookup, sparse_top_n, top_n, user_item_matrix


class DenseItemKNN:
    """The dense (I+1, I+1) item-kNN recipe, the reference the sparse one must match."""

    def __init__(self, train: list[np.ndarray], n_items: int) -> None:
        x = user_item_matrix(train, n_items)
        self.co = (x.T @ x).toarray().astype(np.float32)
        self.count = np.diag(self.co).copy()
        norm = np.sqrt(np.maximum(self.count, 1.0))
        self.sim = self.co / norm[:, None] / norm[None, :]
        np.fill_diagonal(self.sim, 0.0)
        self.n_items = n_items

    def recall(self, histories: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        h = user_item_matrix(histories, self.n_items)
        return top_n(np.asarray(h @ self.sim), h.toarray() > 0, n)

    def prefix_recall(self, seq: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        own = np.zeros(self.n_items + 1, dtype=np.float32)
        own[seq] = 1.0
        co = self.co[seq] - own[None, :]
        denom = (
            np.sqrt(np.maximum(self.count[seq], 1.0))[:, None]
            * np.sqrt(np.maximum(self.count - own, 1.0))[None, :]
        )
        rows = np.maximum(co, 0.0) / denom
        rows[np.arange(len(seq)), seq] = 0.0
        cum = np.cumsum(rows, axis=0)[start - 1 : len(seq) - 1]
        seen = np.zeros_like(cum, dtype=bool)
        for j, t in enumerate(range(start, len(seq))):
            seen[j, seq[:t]] = True
        return top_n(cum, seen, n)


@pytest.fixture(scope="module")
def data():
    # Many items and short histories: sparse rows, lists that run past the scored items.
    return synthetic_split(300, 400, 12, 3)


@pytest.fixture(scope="module")
def knns(data):
    ds, split, _ = data
    return ItemKNN(split.train, ds.n_items), DenseItemKNN(split.train, ds.n_items)


def test_item_knn_similarities_equal_the_dense_recipe(knns):
    knn, dense = knns
    np.testing.assert_array_equal(knn.sim.toarray(), dense.sim)
    np.testing.assert_array_equal(knn.co.m.toarray(), dense.co)
    np.testing.assert_array_equal(knn.count, dense.count)


@pytest.mark.parametrize("n", [10, 100, 399])
def test_item_knn_recall_equals_the_dense_lists(data, knns, n):
    _, _, test_hist = data
    knn, dense = knns
    items, scores = knn.recall(test_hist, n, chunk=64)
    want_items, want_scores = dense.recall(test_hist, n)
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("n", [10, 100])
def test_item_knn_prefix_recall_equals_the_dense_lists(data, knns, n):
    _, split, _ = data
    knn, dense = knns
    for seq in split.train[:40]:
        items, scores = knn.prefix_recall(seq, 3, n)
        want_items, want_scores = dense.prefix_recall(seq, 3, n)
        np.testing.assert_array_equal(items, want_items)
        np.testing.assert_array_equal(scores, want_scores)


def test_item_knn_keeps_the_top_neighbours_past_its_budget(data, knns, monkeypatch):
    ds, split, test_hist = data
    _, dense = knns
    monkeypatch.setattr(ItemKNN, "max_nonzeros", 20 * (ds.n_items + 1))
    monkeypatch.setattr(ItemKNN, "block", 64)  # several blocks
    knn = ItemKNN(split.train, ds.n_items)
    assert np.diff(knn.sim.indptr).max() <= 20
    assert knn.sim.nnz < np.count_nonzero(dense.sim)
    # Each kept similarity is the dense one, and is at least every dropped one of its row.
    sim = knn.sim.toarray()
    kept = sim > 0
    np.testing.assert_array_equal(sim[kept], dense.sim[kept])
    dropped = np.where(kept, -np.inf, dense.sim).max(axis=1)
    floor = np.where(kept, sim, np.inf).min(axis=1)
    full = kept.sum(axis=1) == 20
    assert (dropped[full] <= floor[full]).all()
    # co keeps the same entries and the diagonal; lookups of dropped pairs read 0.
    co = knn.co.m.toarray()
    np.testing.assert_array_equal(co[kept], dense.co[kept])
    np.testing.assert_array_equal(np.diag(co), dense.count)
    items, _ = knn.recall(test_hist, 10)
    assert items.shape == (len(test_hist), 10)


def test_pair_lookup_equals_dense_fancy_indexing(monkeypatch):
    rng = np.random.default_rng(0)
    m = sp.random(50, 50, density=0.1, random_state=1, dtype=np.float32)
    rows, cols = rng.integers(0, 50, (7, 5, 1)), rng.integers(0, 50, (7, 1, 4))
    want = m.toarray()[rows, cols]
    monkeypatch.setattr(PairLookup, "dense_max", 10)  # the sparse path
    got = PairLookup(m)[rows, cols]
    assert got.shape == (7, 5, 4)
    np.testing.assert_array_equal(got, want)


def test_sparse_top_n_with_a_prior_equals_the_dense_top_n():
    rng = np.random.default_rng(2)
    scores = sp.random(40, 300, density=0.02, random_state=3, format="csr")
    prior = 1e-6 * rng.random(300)
    prior[0] = 0.0
    prior[50:60] = prior[49]  # ties in the prior: broken by row
    histories = [
        rng.choice(np.arange(1, 300), rng.integers(1, 20), replace=False) for _ in range(40)
    ]
    seen = np.zeros((40, 300), dtype=bool)
    for b, h in enumerate(histories):
        seen[b, h] = True
    for n in (5, 50, 299):
        want = top_n(scores.toarray() + prior[None, :], seen, n)
        got = sparse_top_n(scores, histories, n, prior, chunk=16)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_top_n_breaks_ties_at_the_cut_by_row():
    scores = np.zeros((1, 40))
    scores[0, [30, 5]] = 2.0
    got, _ = top_n(scores, np.zeros_like(scores, dtype=bool), 5)
    np.testing.assert_array_equal(got[0], [5, 30, 1, 2, 3])


def _dense_transitions(train: list[np.ndarray], n_items: int, window: int = 3) -> np.ndarray:
    t = np.zeros((n_items + 1, n_items + 1), dtype=np.float32)
    for seq in train:
        for step in range(1, window + 1):
            np.add.at(t, (seq[:-step], seq[step:]), 1.0 / step)
    return t


def test_transitions_equal_the_dense_counts(data, monkeypatch):
    from training.features import transition_matrix, transitions

    ds, split, _ = data
    want = _dense_transitions(split.train, ds.n_items)
    np.testing.assert_allclose(transition_matrix(split.train, ds.n_items).toarray(), want,
                               rtol=1e-6)  # fmt: skip
    rows, cols = split.train[0][:, None], split.train[1][None, :]
    monkeypatch.setattr(PairLookup, "dense_max", 10)
    np.testing.assert_allclose(transitions(split.train, ds.n_items)[rows, cols],
                               want[rows, cols], rtol=1e-6)  # fmt: skip


def test_sparse_svd_factors_equal_the_dense_ones_up_to_sign(knns, monkeypatch):
    import training.features as features

    knn, _ = knns
    want_u, want_v = features._svd_factors(knn.sim, 8)
    monkeypatch.setattr(features, "DENSE_SVD_MAX", 10)
    got_u, got_v = features._svd_factors(knn.sim, 8)
    sign = np.sign((got_u * want_u).sum(axis=0))
    np.testing.assert_allclose(got_u * sign, want_u, atol=2e-4)
    np.testing.assert_allclose(got_v * sign, want_v, atol=2e-4)


def test_markov_lists_equal_the_dense_scores(data):
    from training.channels import Markov

    ds, split, test_hist = data
    markov = Markov(split.train, ds.n_items, window=4, alpha=0.5, last=3)
    q = weighted_matrix(test_hist, ds.n_items, markov.query_decay, last=markov.last)
    dense = (q @ markov.t).toarray() + markov.prior[None, :]
    for n in (10, 200):
        want = top_n(dense, _seen(test_hist, ds.n_items), n)
        got = markov.recall(test_hist, n, chunk=50)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_ease_under_its_limit_equals_the_dense_recipe(data):
    from training.channels import EASE

    ds, split, test_hist = data
    ease = EASE(split.train, ds.n_items, lam=50.0, decay=0.9)
    x = weighted_matrix(split.train, ds.n_items, 0.9)[:, 1:]
    g = (x.T @ x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += 50.0
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    full = np.zeros((ds.n_items + 1, ds.n_items + 1), dtype=np.float32)
    full[1:, 1:] = b
    np.testing.assert_array_equal(ease.b, full)
    q = weighted_matrix(test_hist, ds.n_items, 0.9)
    want = top_n(np.asarray(q @ full, dtype=np.float64), _seen(test_hist, ds.n_items), 20)
    got = ease.recall(test_hist, 20)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _seen(histories: list[np.ndarray], n_items: int) -> np.ndarray:
    seen = np.zeros((len(histories), n_items + 1), dtype=bool)
    for b, h in enumerate(histories):
        seen[b, h] = True
    return seen


def _dense_fuse(rrf, lists, n, n_items):
    """RRF over a dense (B, I+1) score matrix and features from dense lookups: the
    reference the sparse fusion must match."""
    from training.fusion import RANK_DEFAULT, SCORE_DEFAULT

    b = len(next(iter(lists.values()))[0])
    r = np.arange(b)[:, None]
    fused = np.zeros((b, n_items + 1))
    for name, (items, scores) in lists.items():
        w = rrf.weights.get(name, 0.0)
        if w > 0:
            rank = np.arange(1, items.shape[1] + 1)[None, :]
            fused[r, items] += np.where(np.isfinite(scores), w / (rrf.k + rank), 0.0)
    items, score = top_n(fused, fused <= 0, n)
    absent = ~np.isfinite(score) | (score <= 0)
    items, score = np.where(absent, 0, items), np.where(absent, 0.0, score)
    out = []
    for it, sc in lists.values():
        rank = np.full((b, n_items + 1), RANK_DEFAULT)
        value = np.full((b, n_items + 1), SCORE_DEFAULT)
        ranks = np.broadcast_to(np.arange(1, it.shape[1] + 1, dtype=np.float64), it.shape)
        rank[r, it] = np.where(np.isfinite(sc), ranks, RANK_DEFAULT)
        value[r, it] = np.where(np.isfinite(sc), sc, SCORE_DEFAULT)
        rank[:, 0], value[:, 0] = RANK_DEFAULT, SCORE_DEFAULT
        out += [np.take_along_axis(rank, items, 1), np.take_along_axis(value, items, 1)]
    return items, score, np.stack(out, axis=-1).astype(np.float32)


def test_sparse_fusion_equals_the_dense_fusion():
    from training.fusion import RRF

    rng = np.random.default_rng(5)
    n_items, b, depth = 60, 70, 15
    lists = {}
    for name in ("ease", "markov", "sasrec", "als"):
        items = np.stack([rng.choice(np.arange(1, n_items + 1), depth, replace=False)
                          for _ in range(b)])  # fmt: skip
        scores = np.sort(rng.random((b, depth)), axis=1)[:, ::-1].copy()
        scores[rng.random((b, depth)) < 0.1] = -np.inf  # seen fill-ins: no vote
        lists[name] = (items, scores)
    rrf = RRF({"ease": 2.0, "markov": 1.0, "sasrec": 1.0}, k=10.0)  # als: features only
    for n in (5, 30, 59):  # 59: past the items any list recalls, padded with 0
        want = _dense_fuse(rrf, lists, n, n_items)
        got = rrf.fuse(lists, n, n_items, chunk=16)
        np.testing.assert_array_equal(got.items, want[0])
        np.testing.assert_array_equal(got.score, want[1])
        np.testing.assert_array_equal(got.features, want[2])


def test_rrf_tuning_past_max_rows_scores_a_fixed_subset():
    from training.fusion import tune_rrf

    rng = np.random.default_rng(6)
    scores = np.tile(np.linspace(1.0, 0.1, 10), (300, 1))
    lists = {
        c: (np.stack([rng.permutation(np.arange(1, 40))[:10] for _ in range(300)]), scores)
        for c in ("ease", "markov")
    }
    truth = lists["ease"][0][:, 0].copy()
    truth[::2] = 40  # half the rows: a truth no list holds
    small = tune_rrf(lists, truth, 10, 40, max_rows=100, passes=1)
    assert small.trials == tune_rrf(lists, truth, 10, 40, max_rows=100, passes=1).trials
    keep = np.sort(np.random.default_rng(0).choice(300, 100, replace=False))
    subset = {c: (items[keep], scores[keep]) for c, (items, scores) in lists.items()}
    assert small.trials == tune_rrf(subset, truth[keep], 10, 40, passes=1).trials
    full = tune_rrf(lists, truth, 10, 40, passes=1)
    assert small.trials[0]["recall@10"] != full.trials[0]["recall@10"]
