"""Model wrapper: padding to buckets changes no score; cand_rank only when declared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.errors import ModelError
from app.model import Job, LoadedModel, bucket, choose_providers, ladder, load_session, open_model
from contract import verify_folder
from tests.conftest import VERSION_A
from tests.reference import Reference


def test_ladder_and_bucket() -> None:
    assert ladder(50) == [1, 2, 4, 8, 16, 32, 50]
    assert ladder(1000, 8) == [8, 16, 32, 64, 128, 256, 512, 1000]
    assert bucket(3, [1, 2, 4]) == 4 and bucket(4, [1, 2, 4]) == 4


def test_providers() -> None:
    assert choose_providers([]) == ["CPUExecutionProvider"]  # no GPU on this machine
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ModelError, match="onnx_providers"):
        choose_providers(["TensorrtExecutionProvider"])


def test_padded_batch_equals_single_unpadded_runs(
    model_dir: Path, references: dict[str, Reference]
) -> None:
    folder = model_dir / VERSION_A
    model = open_model(folder, verify_folder(folder), ["CPUExecutionProvider"], 1, 64, 4)
    assert model.has_cand_rank
    ref = references[VERSION_A]
    rng = np.random.default_rng(3)
    ids = [str(i) for i in range(1, 201)]
    jobs, expected = [], []
    for lh, nc in [(0, 5), (3, 17), (8, 1), (5, 40)]:
        hist = [str(i) for i in rng.choice(ids, lh)]
        cands = [str(i) for i in rng.choice(ids, nc, replace=False)]
        scores, attn, _, _ = ref.score(hist, cands)
        jobs.append(
            Job(
                np.stack([ref.vectors[i] for i in hist]) if hist else np.zeros((0, 16), np.float32),
                np.stack([ref.vectors[i] for i in cands]),
                np.arange(nc, dtype=np.float32),
            )
        )
        expected.append((np.array([scores[c] for c in cands]), attn))
    for got, (scores, attn) in zip(model.run_batch(jobs), expected, strict=True):
        np.testing.assert_allclose(got.scores, scores, atol=1e-5)
        np.testing.assert_allclose(got.attn, attn, atol=1e-5)


def graph_without_cand_rank(path: Path, cand_feats: bool = False) -> None:
    """A stand-in model of the older contract: scores = sum(cand), attn = cand @ hist^T.

    ``cand_feats`` declares that optional input too (the graph does not read it).
    """
    inputs = [
        helper.make_tensor_value_info("hist", TensorProto.FLOAT, ["B", "L", 16]),
        helper.make_tensor_value_info("hist_mask", TensorProto.BOOL, ["B", "L"]),
        helper.make_tensor_value_info("cand", TensorProto.FLOAT, ["B", "N", 16]),
        helper.make_tensor_value_info("cand_mask", TensorProto.BOOL, ["B", "N"]),
    ]
    if cand_feats:
        inputs.append(helper.make_tensor_value_info("cand_feats", TensorProto.FLOAT, ["B", "N", 4]))
    outputs = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "N"]),
        helper.make_tensor_value_info("attn", TensorProto.FLOAT, ["B", "N", "L"]),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    nodes = [
        helper.make_node("ReduceSum", ["cand", "axes"], ["scores"], keepdims=0),
        helper.make_node("Transpose", ["hist"], ["hist_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["cand", "hist_t"], ["attn"]),
    ]
    graph = helper.make_graph(nodes, "old", inputs, outputs, initializer=[axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_graph_without_cand_rank_is_fed_without_it(model_dir: Path, tmp_path: Path) -> None:
    graph_without_cand_rank(tmp_path / "old.onnx")
    manifest = verify_folder(model_dir / VERSION_A)
    session = load_session(tmp_path / "old.onnx", ["CPUExecutionProvider"], 1)
    model = LoadedModel(manifest, session, 64)
    assert not model.has_cand_rank
    cand = np.ones((3, 16), np.float32)
    (out,) = model.run_batch([Job(np.ones((2, 16), np.float32), cand, np.arange(3.0))])
    np.testing.assert_allclose(out.scores, [16, 16, 16])
    assert out.attn.shape == (3, 2)


def test_a_graph_that_wants_cand_feats_is_refused_at_load(model_dir: Path, tmp_path: Path) -> None:
    """A graph that wants cand_feats, served with a manifest that names no features, fails
    its load, not every batch."""
    graph_without_cand_rank(tmp_path / "feats.onnx", cand_feats=True)
    session = load_session(tmp_path / "feats.onnx", ["CPUExecutionProvider"], 1)
    with pytest.raises(ModelError, match="cand_feats"):
        LoadedModel(verify_folder(model_dir / VERSION_A), session, 64)


def test_a_broken_file_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        load_session(tmp_path / "bad.onnx", ["CPUExecutionProvider"], 1)
