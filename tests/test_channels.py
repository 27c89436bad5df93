"""Recall channels (EASE, Markov, SASRec) and their fusion, on synthetic data with a planted
successor order (training.data.synthetic)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.conftest import synthetic_split
from training.channels import EASE, Channel, Markov, popularity, weighted_matrix
from training.fusion import (
    RANK_DEFAULT,
    RRF,
    SCORE_DEFAULT,
    build_lists,
    candidate_features,
    list_metrics,
    run_channels,
    time_cut,
    tune_rrf,
)
from training.recall import ItemKNN
from training.sasrec import SASRecConfig, SASRecRecall

SMALL_SASREC = SASRecConfig(
    history_len=20, dim=32, n_layers=1, n_heads=1, dropout=0.1, lr=5e-3, batch_size=64,
    max_epochs=15, patience=15, threads=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return synthetic_split(200, 120, 30, 1)


@pytest.fixture(scope="module")
def channels(data) -> dict[str, Channel]:
    ds, split, _ = data
    return {
        "ease": EASE(split.train, ds.n_items, lam=50.0, decay=0.95),
        "markov": Markov(split.train, ds.n_items, window=3, last=5, query_decay=0.8),
        "sasrec": SASRecRecall(split.train, ds.n_items, split.val, SMALL_SASREC),
    }


def _popularity_lists(split, histories, n_items, n):
    pop = popularity(split.train, n_items)
    scores = np.tile(pop, (len(histories), 1))
    seen = np.zeros(scores.shape, dtype=bool)
    for b, h in enumerate(histories):
        seen[b, h] = True
    from training.recall import top_n

    return top_n(scores, seen, n)[0]


@pytest.mark.parametrize("name", ["ease", "markov", "sasrec"])
def test_lists_exclude_seen_items_and_are_sorted(data, channels, name):
    _, _, test_hist = data
    items, scores = channels[name].recall(test_hist, 30)
    assert items.shape == scores.shape == (len(test_hist), 30)
    for h, row in zip(test_hist, items, strict=True):
        assert not set(row) & set(h.tolist())
        assert 0 not in row
        assert len(set(row)) == len(row)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_lists_are_reproducible(data, channels):
    ds, split, test_hist = data
    again: dict[str, Channel] = {
        "ease": EASE(split.train, ds.n_items, lam=50.0, decay=0.95),
        "markov": Markov(split.train, ds.n_items, window=3, last=5, query_decay=0.8),
        "sasrec": SASRecRecall(
            split.train, ds.n_items, split.val,
            replace(SMALL_SASREC, max_epochs=3),
        ),
    }  # fmt: skip
    first_sasrec = SASRecRecall(
        split.train, ds.n_items, split.val,
        replace(SMALL_SASREC, max_epochs=3),
    )  # fmt: skip
    for name in ("ease", "markov"):
        a, sa = channels[name].recall(test_hist, 20)
        b, sb = again[name].recall(test_hist, 20)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)
    a, sa = first_sasrec.recall(test_hist, 20)
    b, sb = again["sasrec"].recall(test_hist, 20)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)


@pytest.mark.parametrize("name", ["markov", "sasrec"])
def test_sequential_channels_find_the_planted_successor(data, channels, name):
    ds, split, test_hist = data
    items, _ = channels[name].recall(test_hist, 10)
    pop = _popularity_lists(split, test_hist, ds.n_items, 10)
    hr = list_metrics(items, split.test)["hr@10"]
    hr_pop = list_metrics(pop, split.test)["hr@10"]
    assert hr > 0.5
    assert hr > 2.5 * hr_pop


def test_recency_weights_favour_the_newest_items():
    m = weighted_matrix([np.array([3, 1, 2])], n_items=4, decay=0.5).toarray()
    np.testing.assert_allclose(m[0], [0.0, 0.5, 1.0, 0.25, 0.0])
    last = weighted_matrix([np.array([3, 1, 2])], n_items=4, decay=0.5, last=2).toarray()
    np.testing.assert_allclose(last[0], [0.0, 0.5, 1.0, 0.0, 0.0])


def test_ease_past_its_limit_fits_the_most_popular_items(data, monkeypatch, capsys):
    ds, split, test_hist = data
    monkeypatch.setattr(EASE, "max_items", 50)
    ease = EASE(split.train, ds.n_items)
    assert "fitted on the 50 most popular" in capsys.readouterr().err
    pop = popularity(split.train, ds.n_items)
    top = np.lexsort((np.arange(ds.n_items + 1), -pop))[:50]
    np.testing.assert_array_equal(ease.cols[1:], np.sort(top))
    assert ease.b.shape == (51, 51)
    items, scores = ease.recall(test_hist, 10)
    assert np.isin(items, ease.cols[1:]).all()
    for h, row in zip(test_hist, items, strict=True):
        assert not np.isin(row, h).any()


def test_sasrec_sampled_softmax_trains_past_the_threshold(data):
    ds, split, test_hist = data
    cfg = replace(SMALL_SASREC, full_softmax_max=50, n_negatives=64, max_epochs=10)
    model = SASRecRecall(split.train, ds.n_items, split.val, cfg)
    items, _ = model.recall(test_hist, 10)
    pop = _popularity_lists(split, test_hist, ds.n_items, 10)
    assert list_metrics(items, split.test)["hr@10"] > 2 * list_metrics(pop, split.test)["hr@10"]


def test_fused_features_are_each_channels_rank_and_score(data, channels):
    ds, _, test_hist = data
    lists = run_channels(list(channels.values()), test_hist, 15)
    fusion = RRF({"ease": 1.0, "markov": 2.0, "sasrec": 0.0}, k=10.0)
    fused = fusion.fuse(lists, 25, ds.n_items)
    spec = candidate_features(["ease", "markov", "sasrec"])
    assert fused.names == [f["name"] for f in spec]
    assert fused.names[:2] == ["ease_rank", "ease_score"]
    assert {f["default"] for f in spec} == {RANK_DEFAULT, SCORE_DEFAULT}
    assert fused.features.shape == (len(test_hist), 25, 6)
    for b in range(len(test_hist)):
        voting = set(lists["ease"][0][b]) | set(lists["markov"][0][b])
        for j, item in enumerate(fused.items[b]):
            if item == 0:  # the list ran out: padding with default features
                assert not (set(voting) - set(fused.items[b]))
                assert list(fused.features[b, j, 0::2]) == [RANK_DEFAULT] * 3
                continue
            assert item in voting  # sasrec weighs 0: it gives features but no candidates
            expected = 0.0
            for c, (name, w) in enumerate([("ease", 1.0), ("markov", 2.0), ("sasrec", 0.0)]):
                row_items, row_scores = lists[name][0][b], lists[name][1][b]
                where = np.flatnonzero(row_items == item)
                rank, score = fused.features[b, j, 2 * c], fused.features[b, j, 2 * c + 1]
                if len(where):
                    assert rank == where[0] + 1
                    assert score == pytest.approx(row_scores[where[0]], rel=1e-6, abs=1e-6)
                    expected += w / (10.0 + where[0] + 1)
                else:
                    assert (rank, score) == (RANK_DEFAULT, SCORE_DEFAULT)
            assert fused.score[b, j] == pytest.approx(expected)
        assert np.all(np.diff(fused.score[b]) <= 1e-12)


def test_build_lists_and_tuning_on_validation(data, channels):
    ds, split, _ = data
    val_hist = [split.val_history(u) for u in range(len(ds.users))]
    lists = run_channels(list(channels.values()), val_hist, 30)
    tuned = tune_rrf(lists, split.val, 20, ds.n_items, ks=(10.0, 60.0), grid=(0.0, 1.0))
    equal = list_metrics(
        RRF(dict.fromkeys(lists, 1.0), 10.0).order(lists, 20, ds.n_items), split.val
    )
    assert tuned.score >= equal["ndcg@10"]
    fused = build_lists(list(channels.values()), tuned.fusion, val_hist, 20, ds.n_items, depth=30)
    np.testing.assert_array_equal(fused.items, tuned.fusion.order(lists, 20, ds.n_items))


def test_time_cut_keeps_each_query_target_out_of_the_fit(data):
    ds, split, _ = data
    fit, q = time_cut(split.train, holdout=4)
    assert len(q.target) == 4 * len(split.train)
    for u, h, t in zip(q.user, q.history, q.target, strict=True):
        seq = split.train[u]
        np.testing.assert_array_equal(h, seq[: len(h)])  # a prefix
        assert seq[len(h)] == t
        assert len(h) >= len(fit[u])  # everything from the target on is outside the fit
        np.testing.assert_array_equal(fit[u], seq[: len(fit[u])])
    first = q.first_held_out(len(split.train))
    assert [first[u] for u in range(3)] == [split.train[u][len(fit[u])] for u in range(3)]
    knn = ItemKNN(fit, ds.n_items)  # any channel can answer the queries
    items, _ = knn.recall(q.history, 10)
    assert items.shape == (len(q.target), 10)


def test_sasrec_time_cap_stops_within_an_epoch(data):
    ds, split, _ = data
    cfg = replace(SMALL_SASREC, max_minutes=0.0, batch_size=16)
    model = SASRecRecall(split.train, ds.n_items, split.val, cfg)
    assert len(model.log) == 1
    assert model.log[0]["windows"] == 16  # one batch, then the cap


def test_sasrec_validates_on_a_sample_of_users_past_its_limit(data, monkeypatch):
    ds, split, _ = data
    asked: list[int] = []
    recall = SASRecRecall.recall

    def counted(self, histories, n, chunk=512):
        asked.append(len(histories))
        return recall(self, histories, n, chunk)

    monkeypatch.setattr(SASRecRecall, "recall", counted)
    cfg = replace(SMALL_SASREC, max_epochs=2, val_users=50)
    model = SASRecRecall(split.train, ds.n_items, split.val, cfg)
    assert asked == [50, 50] and len(model.log) == 2
    asked.clear()
    SASRecRecall(split.train, ds.n_items, split.val, replace(cfg, val_users=len(split.train)))
    assert asked == [len(split.train)] * 2  # at the limit: every user
