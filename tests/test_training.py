"""The offline pipeline on synthetic data with planted order: seconds, no download."""

from pathlib import Path

import numpy as np
import pytest

from training.data import synthetic
from training.fusion import ChannelParams
from training.pipeline import PipelineConfig, fit, prepare, run
from training.sasrec import SASRecConfig
from training.train import TrainConfig

# A SASRec channel of a few seconds: enough to rank, not to be good.
SMALL_SASREC = SASRecConfig(history_len=10, dim=16, n_layers=1, n_heads=1, max_epochs=3, threads=1)


def _cfg(epochs: int = 12) -> PipelineConfig:
    return PipelineConfig(
        n_candidates=30,
        history_len=10,
        dim=16,
        n_layers=1,
        hidden=32,
        use_text=False,
        als_factors=16,
        channel_depth=60,
        fused_holdout=8,
        lists_per_user=10,
        channel_params=ChannelParams(sasrec=SMALL_SASREC),
        train=TrainConfig(epochs=epochs, batch_size=128, lr=5e-3, patience=4),
    )


@pytest.fixture(scope="module")
def dataset():  # type: ignore[no-untyped-def]
    return synthetic(n_users=300, n_items=150, length=30, follow=0.7, seed=0)


def test_pipeline_learns_the_planted_order(dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    folder = run(dataset, tmp_path, _cfg(), version="synthetic-test")
    report = json.loads((folder / "report.json").read_text())
    knn = report["summary"]["item-knn"]
    assert knn["deep reranker"]["ndcg@10"] > 1.5 * knn["recall order"]["ndcg@10"]
    assert knn["deep reranker"]["ndcg@10"] > knn["popularity order"]["ndcg@10"]
    for name in (
        "model.onnx",
        "item_vectors.npy",
        "item_ids.txt",
        "manifest.json",
        "report.md",
        "report.png",
    ):
        assert (folder / name).stat().st_size > 0


def test_test_item_never_reaches_training(dataset) -> None:  # type: ignore[no-untyped-def]
    """Changing user 0's test item changes nothing that training or features read."""
    cfg = _cfg()
    other = synthetic(n_users=300, n_items=150, length=30, follow=0.7, seed=0)
    seq = other.sequences[0]
    unseen = next(i for i in range(1, 151) if i not in set(seq.tolist()))
    other.sequences[0] = np.append(seq[:-1], unseen)
    a, b = prepare(dataset, cfg), prepare(other, cfg)
    for field in ("hist", "cand", "target", "user", "feats"):
        np.testing.assert_array_equal(getattr(a.train_lists, field), getattr(b.train_lists, field))
    np.testing.assert_array_equal(a.val_lists.feats, b.val_lists.feats)
    assert a.fusion == b.fusion
    np.testing.assert_array_equal(a.cf, b.cf)
    np.testing.assert_array_equal(a.stats, b.stats)
    np.testing.assert_array_equal(a.val_lists.cand, b.val_lists.cand)
    np.testing.assert_array_equal(a.test_lists["item-knn"].cand, b.test_lists["item-knn"].cand)
    np.testing.assert_array_equal(a.test_lists["item-knn"].hist, b.test_lists["item-knn"].hist)
    np.testing.assert_array_equal(a.test_lists["fused"].cand, b.test_lists["fused"].cand)
    np.testing.assert_array_equal(a.test_lists["fused"].feats, b.test_lists["fused"].feats)


def test_weight_averaging_is_kept_only_when_validation_says_so(dataset) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from training.pipeline import fit
    from training.train import _mean_state, evaluate_ndcg

    cfg = _cfg(epochs=4)
    cfg = replace(cfg, train=replace(cfg.train, average_last=3))
    prep = prepare(dataset, cfg)
    model, log = fit(prep, cfg)
    epochs = [e["val_ndcg@10"] for e in log if e["epoch"] >= 0]
    averaged = [e["val_ndcg@10"] for e in log if e["epoch"] < 0]
    assert len(epochs) == 4 and len(averaged) == 1 and log[-1]["epoch"] == -3
    # The returned model is the better of the best epoch and the mean of the last three.
    assert evaluate_ndcg(model, prep.val_lists) == pytest.approx(max(*epochs, *averaged))

    a = {"w": np.ones(2, np.float32), "step": np.array([1])}
    b = {"w": 3 * np.ones(2, np.float32), "step": np.array([2])}
    import torch

    mean = _mean_state([{k: torch.from_numpy(v) for k, v in s.items()} for s in (a, b)])
    assert mean["w"].tolist() == [2.0, 2.0] and mean["step"].tolist() == [2]


def test_training_is_reproducible(dataset) -> None:  # type: ignore[no-untyped-def]
    """The same seed gives the same weights, bit for bit: one run's figures mean something."""
    cfg = _cfg(epochs=2)
    prep = prepare(dataset, cfg)
    first, second = (fit(prep, cfg)[0].state_dict() for _ in range(2))
    for name, weights in first.items():
        assert np.array_equal(weights.numpy(), second[name].numpy()), name


def test_capped_users_keeps_whole_users_up_to_the_cap() -> None:
    from training.pipeline import capped_users

    counts = np.array([3, 0, 5, 2, 4, 1, 0, 6])
    np.testing.assert_array_equal(capped_users(counts, 21, seed=0), [0, 2, 3, 4, 5, 7])
    kept = capped_users(counts, 10, seed=0)
    assert 0 < counts[kept].sum() <= 10 and (counts[kept] > 0).all()
    np.testing.assert_array_equal(kept, np.sort(kept))
    np.testing.assert_array_equal(kept, capped_users(counts, 10, seed=0))


@pytest.fixture(scope="module")
def capped(dataset):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    cfg = replace(_cfg(), max_fused_queries=400, max_knn_queries=300)
    return cfg, prepare(dataset, cfg)


def test_training_queries_past_the_caps_come_from_a_sample_of_users(capped) -> None:  # type: ignore[no-untyped-def]
    cfg, prep = capped
    lists, split = prep.train_lists, prep.split
    n_fused = prep.recall["fused training lists"]["lists"]
    fused_users, knn_users = np.unique(lists.user[:n_fused]), np.unique(lists.user[n_fused:])
    # 300 users of 28 training items: 8 fused queries and 10 item-kNN positions each.
    assert 0 < n_fused <= 400 and 0 < len(fused_users) <= 400 // 8
    assert 0 < len(lists) - n_fused <= 300 and 0 < len(knn_users) <= 300 // 10
    for row in range(n_fused, len(lists)):  # each list's true item is its user's
        item = lists.cand[row, lists.target[row]]
        assert item in split.train[lists.user[row]]


def test_max_minutes_holds_within_an_epoch(capped) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    cfg, prep = capped
    cfg = replace(cfg, train=replace(cfg.train, max_minutes=0.0))
    _, log = fit(prep, cfg)
    assert len(log) == 1
    assert log[0]["lists"] == cfg.train.batch_size < len(prep.train_lists)  # one batch


def test_a_deadline_before_max_minutes_stops_training(capped) -> None:  # type: ignore[no-untyped-def]
    import time

    cfg, prep = capped
    _, log = fit(prep, cfg, deadline=time.monotonic())  # rerank train's budget already spent
    assert len(log) == 1
    assert log[0]["lists"] == cfg.train.batch_size < len(prep.train_lists)  # one batch


def test_evaluation_past_its_limit_scores_a_sample_of_users(dataset, capped) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from training.evaluate import evaluate, markdown
    from training.metrics import ndcg_at
    from training.pipeline import eval_users

    def tied(lists):  # type: ignore[no-untyped-def]
        return np.zeros(lists.cand.shape)  # a scorer: every candidate tied

    cfg, whole_prep = capped
    cfg = replace(cfg, max_eval_users=100)
    prep = prepare(dataset, cfg)
    users = eval_users(300, 100, cfg.seed)
    assert len(users) == 100 and len(np.unique(users)) == 100
    for lists in (prep.val_lists, *prep.test_lists.values(), *prep.channel_orders.values()):
        np.testing.assert_array_equal(lists.user, users)
    np.testing.assert_array_equal(prep.test_lists["fused"].hist[:, -1],
                                  [prep.split.test_history(u)[-1] for u in users])  # fmt: skip
    report = evaluate(prep, tied, cfg)
    assert report["users"] == 100 and report["users_total"] == 300
    assert markdown(report).startswith("A sample of 100 of the 300 test users")
    target = prep.test_lists["fused"].target
    got = report["summary"]["fused"]["recall order"]["ndcg@10"]
    assert got == pytest.approx(float(ndcg_at(np.where(target >= 0, target, -1)).mean()))
    whole = evaluate(whole_prep, tied, capped[0])
    assert whole["users"] == 300 and "users_total" not in whole
    assert markdown(whole).startswith("All 300 test users")


def test_sasrec_fits_take_the_smaller_cap_past_large_data(dataset) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from training.pipeline import _fit_channels
    from training.split import leave_last_out

    split = leave_last_out(dataset.sequences, dataset.times)
    cfg = replace(_cfg(), channels=("sasrec",), feature_channels=(), large_sasrec_minutes=0.5)
    sizes = sum(len(seq) for seq in split.train)  # 300 users x 28
    for large_data, minutes in ((sizes - 1, 0.5), (sizes, SMALL_SASREC.max_minutes)):
        fitted = _fit_channels(replace(cfg, large_data=large_data), split.train,
                               dataset.n_items, split.val, "fit", {})  # fmt: skip
        assert fitted[0].cfg.max_minutes == minutes  # type: ignore[attr-defined]
