"""The cold path of the item tower (id dropout) and the held-out measurement (training/cold.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.cold import (
    content_scores,
    held_out,
    hold_out,
    insert_target,
    markdown,
    unscored_positions,
)
from training.data import synthetic
from training.fusion import ChannelParams
from training.lists import Lists
from training.model import ItemTower, ModelConfig
from training.pipeline import PipelineConfig
from training.sasrec import SASRecConfig
from training.train import TrainConfig


def tower(id_dropout: float, n_items: int = 50) -> ItemTower:
    cfg = ModelConfig(n_items=n_items, dim=8, text_dim=6, n_attrs=3, n_cf=4, n_stats=5,
                      n_numeric=2, n_heads=2, id_dropout=id_dropout)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    t = ItemTower(*(cfg, *(torch.randn(n_items, w, generator=gen) for w in (6, 3, 4, 5))))
    with torch.no_grad():
        t.unknown.normal_(generator=gen)
    return t


def test_the_cold_path_reads_content_only() -> None:
    t = tower(0.0).eval()
    cold = t.cold_vectors()
    # Neither the id embedding, nor the collaborative factors, nor the usage statistics.
    with torch.no_grad():
        t.id_emb.weight.mul_(3.0)
        t.cf.mul_(-2.0)
        t.stats[:, :3] += 5.0
    torch.testing.assert_close(t.cold_vectors(), cold)
    # The numeric attributes (the last n_numeric statistics) do count.
    with torch.no_grad():
        t.stats[:, 3:] += 1.0
    assert not torch.allclose(t.cold_vectors(), cold)


def test_id_dropout_sends_some_items_cold_in_training_only() -> None:
    t = tower(0.5, n_items=400)
    cold = t.cold(t.text, t.attrs, t.stats[:, 3:])
    torch.manual_seed(0)
    table = t.train().table()
    is_cold = torch.isclose(table, cold, atol=1e-6).all(dim=1)
    assert 0.35 < is_cold.float().mean().item() < 0.65
    warm = t.eval().table()
    assert not torch.isclose(warm, cold, atol=1e-6).all(dim=1).any()
    t.cold_rows = torch.zeros(400, dtype=torch.bool)
    t.cold_rows[7] = True  # the held-out measurement: chosen rows cold in eval mode
    both = t.table()
    torch.testing.assert_close(both[7], cold[7])
    torch.testing.assert_close(both[8], warm[8])


class MeanDot(torch.nn.Module):
    """A stand-in reranker: each candidate's dot with the mean history vector; records the
    recall features it was given."""

    def __init__(self, item_tower: ItemTower) -> None:
        super().__init__()
        self.tower = item_tower
        self.feats: list[torch.Tensor | None] = []

    def forward(
        self, hist: torch.Tensor, cand: torch.Tensor, _: torch.Tensor, feats: torch.Tensor | None
    ) -> tuple[torch.Tensor, None]:
        self.feats.append(feats)
        h, c = self.tower(hist, cand)
        return (c * h.mean(dim=1, keepdim=True)).sum(-1), None


def test_content_scores_put_candidates_on_cold_vectors_and_the_history_on_warm_ones() -> None:
    t = tower(0.0).eval()
    model = MeanDot(t)
    hist = np.array([[1, 2, 3], [4, 5, 6]])
    cand = np.array([[7, 8, 9, 1], [10, 11, 12, 4]])  # 1 and 4 also in the history
    feats = np.ones((2, 4, 2), np.float32)
    lists = Lists(hist, cand, np.array([0, 1]), np.array([0, 1]), feats)
    got = content_scores(model, lists)
    with torch.no_grad():
        warm, cold = t.table(), t.cold(t.text, t.attrs, t.stats[:, t.n_usage :])
        user = warm[torch.from_numpy(hist)].mean(dim=1, keepdim=True)
        want = (cold[torch.from_numpy(cand)] * user).sum(-1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model.feats == [None]  # recall features left out
    assert "forward" not in vars(t) and t.cold_rows is None  # the tower as it was


def test_without_id_dropout_training_sees_no_cold_item() -> None:
    t = tower(0.0).train()
    torch.testing.assert_close(t.table(), t.eval().table())


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="id_dropout"):
        ModelConfig(n_items=5, id_dropout=1.0)
    with pytest.raises(ValueError, match="n_numeric"):
        ModelConfig(n_items=5, n_stats=2, n_numeric=3)


def test_hold_out_keeps_held_items_only_as_last_items() -> None:
    data = synthetic(n_users=80, n_items=60, length=12, seed=1)
    reduced, held = hold_out(data, 0.1, seed=0)
    assert held.sum() == 6 and not held[0]
    for seq in reduced.sequences:
        assert not held[seq[:-1]].any() and len(seq) >= 3
    assert any(held[seq[-1]] for seq in reduced.sequences)
    assert reduced.item_ids == data.item_ids  # the catalogue stays whole


def test_targets_are_placed_and_unscored_ones_go_last() -> None:
    hist = np.zeros((2, 3), dtype=np.int64)
    lists = Lists(hist, np.array([[1, 2, 3, 4], [5, 6, 0, 0]]), np.array([-1, -1]), np.arange(2))
    placed = insert_target(lists, np.array([9, 8]), seed=0)
    for row, truth in ((0, 9), (1, 8)):
        assert placed.cand[row, placed.target[row]] == truth
    assert sorted(placed.cand[0]) == [1, 2, 3, 9]  # N stays: the last candidate went
    assert placed.cand.shape == (2, 4) and sorted(placed.cand[1][placed.cand[1] > 0]) == [5, 6, 8]
    # Unscored: candidates 2 and 9 (target) have no vector; the target ends after the scored.
    lists = Lists(hist[:1], np.array([[1, 2, 9, 3]]), np.array([2]), np.arange(1))
    scores = np.array([[0.1, 5.0, 9.0, 0.3]])
    missing = np.array([[False, True, True, False]])
    assert unscored_positions(scores, lists, missing).tolist() == [3]  # after 3, 1; 2 before it


def test_a_placed_target_takes_the_default_features_and_the_others_keep_theirs() -> None:
    hist = np.zeros((1, 3), dtype=np.int64)
    feats = np.array([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]], dtype=np.float32)
    lists = Lists(hist, np.array([[4, 5, 6]]), np.array([-1]), np.arange(1), feats)
    defaults = np.array([1000.0, 0.0], dtype=np.float32)
    placed = insert_target(lists, np.array([9]), seed=0, defaults=defaults)
    assert placed.feats is not None
    for pos, item in enumerate(placed.cand[0].tolist()):
        want = defaults if item == 9 else feats[0, [4, 5, 6].index(item)]
        np.testing.assert_array_equal(placed.feats[0, pos], want)
    with pytest.raises(ValueError, match="defaults"):
        insert_target(lists, np.array([9]), seed=0)


def test_held_out_measurement_runs_on_a_small_synthetic_set() -> None:
    data = synthetic(n_users=80, n_items=60, length=12, seed=0)
    sasrec = SASRecConfig(history_len=8, dim=8, n_layers=1, n_heads=1, max_epochs=2, threads=1)
    cfg = PipelineConfig(
        n_candidates=20, history_len=8, dim=16, n_layers=1, hidden=32, use_text=False,
        als_factors=8, id_dropout=0.3, channel_depth=40, fused_holdout=3, lists_per_user=5,
        channel_params=ChannelParams(sasrec=sasrec),
        train=TrainConfig(epochs=1, batch_size=64, average_last=0),
    )  # fmt: skip
    report = held_out(data, cfg, fraction=0.1, seed=0)
    assert report["held_out_items"] == 6 and report["lists"] > 0
    assert set(report["sources"]) == {"fused", "item-knn"}
    for rows in report["sources"].values():
        for method in ("caller order", "unscored", "cold vectors", "content rank"):
            assert 0.0 <= rows[method]["ndcg@10"] <= 1.0
        assert rows["cold / caller order"] >= 0.0
    assert "cold vectors / caller order" in markdown(report)
    assert "content rank / caller order" in markdown(report)
