"""The offline pipeline on synthetic data with planted order: seconds, no download."""

from pathlib import Path

import numpy as np
import pytest

from training.data import synthetic
from training.pipeline import PipelineConfig, prepare, run
from training.train import TrainConfig


def _cfg(epochs: int = 12) -> PipelineConfig:
    return PipelineConfig(
        n_candidates=30,
        history_len=10,
        dim=16,
        n_layers=1,
        hidden=32,
        use_text=False,
        als_factors=16,
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
    for field in ("hist", "cand", "target", "user"):
        np.testing.assert_array_equal(getattr(a.train_lists, field), getattr(b.train_lists, field))
    np.testing.assert_array_equal(a.cf, b.cf)
    np.testing.assert_array_equal(a.stats, b.stats)
    np.testing.assert_array_equal(a.val_lists.cand, b.val_lists.cand)
    np.testing.assert_array_equal(a.test_lists["item-knn"].cand, b.test_lists["item-knn"].cand)
    np.testing.assert_array_equal(a.test_lists["item-knn"].hist, b.test_lists["item-knn"].hist)


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


def test_later_items_are_weaker_positives_of_the_same_list(dataset) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from training.train import _tensors

    prep = prepare(dataset, replace(_cfg(), later_window=3))
    lists = prep.train_lists
    assert lists.later is not None and lists.later.shape == (len(lists), 3)
    # Each recorded position holds the user's k-th item after the true one.
    i = int(np.flatnonzero((lists.later >= 0).all(axis=1))[0])
    seq = prep.split.train[lists.user[i]]
    t = int(np.flatnonzero(seq == lists.cand[i, lists.target[i]])[-1])
    for k in range(3):
        assert lists.cand[i, lists.later[i, k]] == seq[t + 1 + k]
    _, _, dist = _tensors(lists, np.array([i]), later_decay=0.5)
    expected = np.zeros(lists.cand.shape[1], dtype=np.float32)
    expected[lists.target[i]] = 1.0
    expected[lists.later[i]] += [0.5, 0.25, 0.125]
    np.testing.assert_allclose(dist[0].numpy(), expected / expected.sum(), rtol=1e-6)
    # Without a decay the target stays the true item's position.
    _, _, plain = _tensors(lists, np.array([i]))
    assert plain.tolist() == [lists.target[i]]
