"""The LightGBM LambdaRank baseline: its grid is decided by validation NDCG@10, its fits are
deterministic, and each list kind gets trees of its own (synthetic data, seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_training import _cfg
from training.data import synthetic
from training.evaluate import LIST_KINDS, RankSet, fit_lambdarank, train_lightgbm, tune_lightgbm
from training.pipeline import prepare

NAMES = ["signal", "noise_a", "noise_b"]
# Without a split (no leaf may hold fewer than a billion rows) every candidate ties.
NO_SPLIT = {"learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 10**9}
GOOD = {"learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 5}


def _lists(n_lists: int, seed: int, n: int = 20) -> RankSet:
    """Lists whose true item sits at a random position, its "signal" feature noisily
    higher than the others'."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, n, n_lists)
    y = np.zeros((n_lists, n), np.float32)
    y[np.arange(n_lists), target] = 1.0
    x = rng.normal(size=(n_lists, n, len(NAMES))).astype(np.float32)
    x[..., 0] += 2.0 * y
    return RankSet(x.reshape(-1, len(NAMES)), y.ravel(), np.full(n_lists, n))


def test_the_grid_entry_with_the_best_validation_score_is_chosen() -> None:
    train, val = _lists(300, 0), _lists(200, 1)
    for grid, want in (([NO_SPLIT, GOOD], 1), ([GOOD, NO_SPLIT], 0)):
        best, rows = tune_lightgbm(train, val, grid, 0, NAMES)
        assert best == want and rows[best]["params"] == GOOD
        assert rows[best]["val_ndcg"] > rows[1 - best]["val_ndcg"] + 0.2
        assert [r["params"] for r in rows] == grid
    # Equal scores: the first entry.
    best, rows = tune_lightgbm(train, val, [GOOD, dict(GOOD)], 0, NAMES)
    assert best == 0 and rows[0]["val_ndcg"] == rows[1]["val_ndcg"]


def test_a_fit_is_deterministic_and_its_seed_matters() -> None:
    train, val, test = _lists(300, 0), _lists(200, 1), _lists(100, 2)
    first, trees, score = fit_lambdarank(train, val, GOOD, 3, NAMES)
    again, trees_again, score_again = fit_lambdarank(train, val, GOOD, 3, NAMES)
    np.testing.assert_array_equal(first.predict(test.x), again.predict(test.x))
    assert (trees, score) == (trees_again, score_again)
    assert first.params["deterministic"] and first.params["num_threads"] == 1
    other, _, _ = fit_lambdarank(train, val, GOOD, 4, NAMES)
    assert not np.array_equal(first.predict(test.x), other.predict(test.x))


def test_rank_set_samples_whole_lists() -> None:
    lists = _lists(50, 0)
    part = lists.sample(10, seed=0)
    assert len(part) == 10 and part.x.shape == (200, len(NAMES))
    assert (part.y.reshape(10, 20).sum(axis=1) == 1).all()  # each list keeps its true item
    assert lists.sample(50, seed=0) is lists


@pytest.fixture(scope="module")
def prep():  # type: ignore[no-untyped-def]
    return prepare(synthetic(n_users=300, n_items=150, length=30, follow=0.7, seed=0), _cfg())


def test_each_list_kind_is_tuned_and_fitted_per_seed(prep) -> None:  # type: ignore[no-untyped-def]
    lgbm = train_lightgbm(prep, seed=0, grid=[NO_SPLIT, GOOD], n_seeds=2)
    assert set(lgbm.boosters) == set(LIST_KINDS) == set(lgbm.info["kinds"])
    n_fused = prep.fused_train_lists
    assert 0 < n_fused < len(prep.train_lists)
    for kind, info in lgbm.info["kinds"].items():
        rows = info["grid"]
        best = max(rows, key=lambda r: r["val_ndcg"])
        assert info["params"] == best["params"] and info["seeds"] == [0, 1]
        for booster in lgbm.boosters[kind]:
            assert booster.params["min_data_in_leaf"] == best["params"]["min_data_in_leaf"]
        assert len(info["trees"]) == len(info["val_ndcg"]) == 2
    fused = lgbm.info["kinds"]["fused"]
    assert fused["train_lists"] == int((prep.train_lists.target[:n_fused] >= 0).sum())
    test = prep.test_lists["item-knn"]
    scores = lgbm.scores("item-knn", test)
    assert len(scores) == 2 and scores[0].shape == test.cand.shape
    again = train_lightgbm(prep, seed=0, grid=[NO_SPLIT, GOOD], n_seeds=2)
    for a, b in zip(scores, again.scores("item-knn", test), strict=True):
        np.testing.assert_array_equal(a, b)
