"""The exported ONNX graph computes what the PyTorch serving path computes."""

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from contract import INPUTS, Manifest, sha256_file
from training import export
from training.export import export_model, export_random_model, random_model
from training.model import ModelConfig


def _inputs(rng: np.random.Generator, b: int, n_hist: int, n_cand: int, dim: int) -> dict:
    hist_mask = rng.random((b, n_hist)) < 0.7
    hist_mask[0] = False  # a user with no history
    hist_mask[1] = True  # a full history
    cand_mask = np.ones((b, n_cand), dtype=bool)
    cand_mask[2, n_cand // 2 :] = False  # a padded candidate row
    return {
        "hist": rng.normal(size=(b, n_hist, dim)).astype(np.float32),
        "hist_mask": hist_mask,
        "cand": rng.normal(size=(b, n_cand, dim)).astype(np.float32),
        "cand_mask": cand_mask,
        "cand_rank": np.tile(np.arange(n_cand, dtype=np.float32), (b, 1)),
    }


@pytest.mark.parametrize(("n_hist", "n_cand"), [(8, 5), (3, 17), (1, 1)])
def test_onnx_matches_torch(tmp_path: Path, n_hist: int, n_cand: int) -> None:
    folder = export_random_model(tmp_path, dim=16, history_len=8)
    model = random_model(ModelConfig(**_config(folder)), seed=0)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = _inputs(np.random.default_rng(1), 4, n_hist, n_cand, 16)
    scores, attn = session.run(["scores", "attn"], feed)
    with torch.no_grad():
        ref_scores, ref_attn = model.score(*(torch.from_numpy(feed[k]) for k in INPUTS))
    valid = feed["cand_mask"]
    assert np.isfinite(scores[valid]).all()
    np.testing.assert_allclose(scores[valid], ref_scores.numpy()[valid], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(attn, ref_attn.numpy(), atol=1e-4, rtol=1e-4)
    assert np.all(attn[0] == 0.0), "an empty history attends to nothing"


def _config(folder: Path) -> dict:
    import json

    return json.loads((folder / "manifest.json").read_text())["model_config"]


def test_manifest_describes_the_files(tmp_path: Path) -> None:
    import json

    folder = export_random_model(tmp_path, n_items=50, dim=16, history_len=8)
    manifest = json.loads((folder / "manifest.json").read_text())
    vectors = np.load(folder / "item_vectors.npy")
    assert vectors.shape == (50, manifest["dim"]) and vectors.dtype == np.float16
    assert manifest["n_items"] == len((folder / "item_ids.txt").read_text().split()) == 50
    assert manifest["opset"] >= 17
    assert manifest["inputs"] == list(INPUTS) and manifest["outputs"] == ["scores", "attn"]
    for name, digest in manifest["sha256"].items():
        assert sha256_file(folder / name) == digest
    assert manifest["dataset"] == "random"  # the caller's extra keys follow the fields
    assert Manifest.from_dict(manifest, "export").to_dict() == manifest


def test_export_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export, "export_onnx", broken)
    cfg = ModelConfig(n_items=11, dim=16, history_len=4, text_dim=8, n_cf=4, hidden=16)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_model(random_model(cfg), [str(i) for i in range(10)], tmp_path, "v1")
    assert list(tmp_path.iterdir()) == [], "a failed export leaves nothing behind"


def test_versions_are_immutable(tmp_path: Path) -> None:
    export_random_model(tmp_path, n_items=20, version="v1")
    with pytest.raises(FileExistsError, match="versions are immutable"):
        export_random_model(tmp_path, n_items=20, version="v1")


def test_padded_candidates_change_no_score() -> None:
    """The list context reads the other candidates, so padding must stay out of it: the
    service pads every list to a bucket size, and a score may not depend on which bucket."""
    cfg = ModelConfig(n_items=11, dim=16, history_len=8, text_dim=8, n_cf=4, hidden=16)
    assert cfg.list_context
    model = random_model(cfg, seed=0)
    arrays = _inputs(np.random.default_rng(2), 4, 8, 6, 16)
    feed = {k: torch.from_numpy(v) for k, v in arrays.items()}
    padded, extra = dict(feed), 5
    padded["cand"] = torch.cat([feed["cand"], 100 * torch.randn(4, extra, 16)], dim=1)
    padded["cand_mask"] = torch.cat([feed["cand_mask"], torch.zeros(4, extra, dtype=torch.bool)], 1)
    padded["cand_rank"] = torch.cat([feed["cand_rank"], torch.zeros(4, extra)], dim=1)
    with torch.no_grad():
        scores, _ = model.score(*(feed[k] for k in INPUTS))
        wider, _ = model.score(*(padded[k] for k in INPUTS))
    valid = feed["cand_mask"]
    np.testing.assert_allclose(wider[:, :6][valid].numpy(), scores[valid].numpy(), atol=1e-5)
    # and the context is really there: another real candidate does change the scores
    padded["cand_mask"] = torch.ones_like(padded["cand_mask"])
    with torch.no_grad():
        crowded, _ = model.score(*(padded[k] for k in INPUTS))
    assert not np.allclose(crowded[:, :6][valid].numpy(), scores[valid].numpy(), atol=1e-5)


def test_context_reads_only_the_head_of_the_list(tmp_path: Path) -> None:
    """Past ``context_size`` a candidate is scored in the context of the list's head and
    changes no other score; the exported graph slices the same head for any N."""
    cfg = ModelConfig(
        n_items=11, dim=16, history_len=8, text_dim=8, n_cf=4, hidden=16, context_size=3
    )
    model = random_model(cfg, seed=0)
    folder = export_model(model, [str(i) for i in range(10)], tmp_path, "v1")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = _inputs(np.random.default_rng(3), 4, 8, 6, 16)
    feed["cand_mask"][:] = True
    changed = {k: v.copy() for k, v in feed.items()}
    changed["cand"][:, 5] += 10.0  # a candidate past the head
    with torch.no_grad():
        ref, _ = model.score(*(torch.from_numpy(feed[k]) for k in INPUTS))
        moved, _ = model.score(*(torch.from_numpy(changed[k]) for k in INPUTS))
    np.testing.assert_allclose(moved[:, :5].numpy(), ref[:, :5].numpy(), atol=1e-6)
    scores, _ = session.run(["scores", "attn"], feed)
    np.testing.assert_allclose(scores, ref.numpy(), atol=1e-4, rtol=1e-4)


FEATURES = [
    {"name": "ease_rank", "default": 1000.0},
    {"name": "ease_score", "default": 0.0},
    {"name": "markov_rank", "default": 1000.0},
]


def test_onnx_matches_torch_with_cand_feats(tmp_path: Path) -> None:
    """A model with candidate features takes ``cand_feats`` and agrees with PyTorch to 1e-4
    on every row, padded candidates and lists of defaults included."""
    folder = export_random_model(tmp_path, dim=16, history_len=8, candidate_features=FEATURES)
    manifest = Manifest.from_json((folder / "manifest.json").read_text(), "export")
    assert manifest.inputs == (*INPUTS, "cand_feats")
    assert manifest.feature_names == ["ease_rank", "ease_score", "markov_rank"]
    model = random_model(ModelConfig.from_dict(_config(folder)), seed=0)
    assert model.cfg.n_feats == 3 and model.cfg.feat_defaults == (1000.0, 0.0, 1000.0)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][-1] == "cand_feats"
    rng = np.random.default_rng(4)
    feed = _inputs(rng, 4, 8, 9, 16)
    feats = np.stack(
        [rng.integers(1, 1000, (4, 9)), rng.normal(0, 50, (4, 9)), rng.integers(1, 1000, (4, 9))],
        axis=-1,
    ).astype(np.float32)
    feats[3] = [1000.0, 0.0, 1000.0]  # a list of plain ids: every feature at its default
    feats[2, ~feed["cand_mask"][2]] = [1000.0, 0.0, 1000.0]  # padded rows hold the defaults
    feed["cand_feats"] = feats
    scores, attn = session.run(["scores", "attn"], feed)
    with torch.no_grad():
        ref_scores, ref_attn = model.score(
            *(torch.from_numpy(feed[k]) for k in (*INPUTS, "cand_feats"))
        )
        no_feats, _ = model.score(*(torch.from_numpy(feed[k]) for k in INPUTS))
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(attn, ref_attn.numpy(), atol=1e-4, rtol=1e-4)
    # Features move the scores; absent features are the defaults.
    assert not np.allclose(scores[0], no_feats.numpy()[0], atol=1e-3)
    np.testing.assert_allclose(ref_scores[3].numpy(), no_feats[3].numpy(), atol=1e-6)


def _features_scored(
    training: bool, **config: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """64 lists of 5 candidates whose 2 features are all 7.0, through one forward pass:
    which candidates the model scored with the defaults (1000, 0), which with theirs, and
    which took the item tower's cold path (id dropout), each (64, 5)."""
    cfg = ModelConfig(
        n_items=11, dim=16, history_len=4, text_dim=8, n_cf=4, hidden=16,
        n_feats=2, feat_defaults=(1000.0, 0.0), **config,
    )  # fmt: skip
    model = random_model(cfg, seed=0)
    seen: list[torch.Tensor] = []
    original = model.score

    def spy(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(args[5])
        return original(*args)

    model.score = spy  # type: ignore[method-assign]
    model.train(training)
    cand = torch.randint(1, 11, (64, 5))
    feats = torch.full((64, 5, 2), 7.0)
    model(torch.randint(1, 11, (64, 4)), cand, torch.zeros(64, dtype=torch.long), feats)
    dropped = model.tower.dropped
    cold = torch.zeros_like(cand, dtype=torch.bool) if dropped is None else dropped[cand]
    return (seen[-1] == torch.tensor([1000.0, 0.0])).all(-1), (seen[-1] == 7.0).all(-1), cold


def test_feature_dropout_sets_whole_lists_to_the_defaults() -> None:
    dropped, _, _ = _features_scored(True, feat_dropout=0.5)  # (B, N)
    per_list = dropped.all(1)
    assert (dropped.any(1) == per_list).all(), "a list is dropped whole or not at all"
    assert 10 < int(per_list.sum()) < 54
    _, kept, _ = _features_scored(False, feat_dropout=0.5)
    assert kept.all(), "no dropout in eval mode"


def test_candidate_feature_dropout_sets_single_candidates_to_the_defaults() -> None:
    dropped, kept, _ = _features_scored(True, feat_dropout=0.0, cand_feat_dropout=0.3)
    assert (dropped | kept).all(), "a candidate keeps all its features or none"
    assert 40 < int(dropped.sum()) < 150  # of 320 at 0.3
    assert int((dropped.any(1) & kept.any(1)).sum()) > 30, "lists mix the two"
    _, kept, _ = _features_scored(False, cand_feat_dropout=0.3)
    assert kept.all(), "no dropout in eval mode"


def test_a_candidate_on_the_cold_path_has_the_feature_defaults_in_that_step() -> None:
    # An item added after training is cold and has no recall features: training sees both.
    defaults, _, cold = _features_scored(True, feat_dropout=0.0, id_dropout=0.5,
                                         cold_without_features=True)  # fmt: skip
    assert 0 < int(cold.sum()) < cold.numel()
    assert torch.equal(defaults, cold)
    defaults, _, cold = _features_scored(True, feat_dropout=0.0, id_dropout=0.5)
    assert cold.any() and not defaults.any(), "without the setting, cold items keep theirs"


def test_export_refuses_features_the_model_lacks(tmp_path: Path) -> None:
    cfg = ModelConfig(n_items=11, dim=16, history_len=4, text_dim=8, n_cf=4, hidden=16)
    with pytest.raises(ValueError, match="candidate_features"):
        export_model(random_model(cfg), [str(i) for i in range(10)], tmp_path, "v1",
                     candidate_features=FEATURES)  # fmt: skip
