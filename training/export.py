"""Export a trained reranker as ``models/<version>/``: model.onnx, vectors, ids, manifest,
and for a model that can add items, item_tower.onnx with its manifest section.

The folder is written under a temporary name and renamed into place, so a half-written
model folder is never left behind for the service or the loader to pick up.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The service reads and checks the folder through this same contract.
from contract import (
    DYNAMIC_AXES,
    IDS_FILE,
    INPUTS,
    INPUTS_WITH_FEATS,
    ONNX_FILE,
    OUTPUTS,
    TOWER_DYNAMIC_AXES,
    TOWER_FILE,
    TOWER_INPUTS,
    TOWER_OUTPUTS,
    VECTORS_FILE,
    ItemTowerSpec,
    Manifest,
    file_hashes,
    sha256_file,
    write_manifest,
)
from training.data import Dataset
from training.model import ColdTowerGraph, ItemTower, ModelConfig, Reranker, ScoreGraph

OPSET = 17
VECTOR_DTYPE = "float16"


def example_inputs(cfg: ModelConfig, batch: int = 2, n: int = 5) -> tuple[torch.Tensor, ...]:
    hist = torch.randn(batch, cfg.history_len, cfg.dim)
    hist_mask = torch.ones(batch, cfg.history_len, dtype=torch.bool)
    cand = torch.randn(batch, n, cfg.dim)
    cand_mask = torch.ones(batch, n, dtype=torch.bool)
    cand_rank = torch.arange(n, dtype=torch.float32).expand(batch, n).contiguous()
    if not cfg.n_feats:
        return hist, hist_mask, cand, cand_mask, cand_rank
    cand_feats = torch.rand(batch, n, cfg.n_feats) * 100.0
    return hist, hist_mask, cand, cand_mask, cand_rank, cand_feats


def graph_inputs(cfg: ModelConfig) -> tuple[str, ...]:
    """The graph's input names: ``cand_feats`` last, when the model has features."""
    return INPUTS_WITH_FEATS if cfg.n_feats else INPUTS


def trace(
    graph: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic: Mapping[str, Mapping[int, str]],
) -> None:
    """Trace ``graph`` on ``example`` to ONNX at ``path``, the axes in ``dynamic`` dynamic."""
    # The TorchScript exporter traces these small static graphs reliably and needs no extra
    # dependency (the torch.export one wants onnxscript); silence its deprecation notice.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, message=".*legacy TorchScript"
        )
        torch.onnx.export(
            graph,
            example,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={k: dict(v) for k, v in dynamic.items()},
            opset_version=OPSET,
            dynamo=False,
        )


@contextmanager
def publish_folder(final: Path) -> Iterator[Path]:
    """A private staging folder beside ``final``, renamed to it when the block ends well and
    removed when it fails: a reader sees the whole folder or none of it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the service may run as another user
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_onnx(model: Reranker, path: Path) -> None:
    """Trace ``Reranker.score`` to ONNX with dynamic B, L and N."""
    inputs = graph_inputs(model.cfg)
    dynamic = {name: DYNAMIC_AXES[name] for name in (*inputs, *OUTPUTS)}
    trace(ScoreGraph(model).eval(), example_inputs(model.cfg), path, inputs, OUTPUTS, dynamic)


def tower_spec(dataset: Dataset, cfg: ModelConfig, text_encoder_sha256: str) -> ItemTowerSpec:
    """The manifest's ``item_tower`` section for a model trained on ``dataset``."""
    width = sum(len(c.values) for c in dataset.categorical_specs)
    if width != cfg.n_attrs or len(dataset.numeric_specs) != cfg.n_numeric:
        raise ValueError(
            f"the data set's attributes ({width} categorical columns, "
            f"{len(dataset.numeric_specs)} numeric) are not the model's "
            f"(n_attrs={cfg.n_attrs}, n_numeric={cfg.n_numeric})"
        )
    return ItemTowerSpec(
        file=TOWER_FILE,
        text_dim=cfg.text_dim,
        dim=cfg.dim,
        text_encoder_sha256=text_encoder_sha256,
        categorical=tuple(dataset.categorical_specs),
        numeric=tuple(dataset.numeric_specs),
    )


def export_item_tower(model: Reranker, path: Path) -> None:
    """Trace the item tower's cold path to ONNX with a dynamic batch (contract/items.py)."""
    cfg = model.cfg
    graph = ColdTowerGraph(model.tower, cfg.n_attrs).eval()
    example = (torch.randn(2, cfg.text_dim), torch.randn(2, cfg.n_attrs + cfg.n_numeric))
    trace(graph, example, path, TOWER_INPUTS, TOWER_OUTPUTS, TOWER_DYNAMIC_AXES)


def export_model(
    model: Reranker,
    item_ids: list[str],
    models_dir: Path,
    version: str,
    extra: dict[str, Any] | None = None,
    tower: ItemTowerSpec | None = None,
    candidate_features: Sequence[dict[str, Any]] | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``models_dir/version/`` atomically and return its path.

    ``item_ids[i]`` is the external id of tower row ``i + 1`` (row 0 is padding).
    ``extra`` lands in the manifest (dataset, training settings, offline metrics).
    ``tower``: also export the item tower's cold path (item_tower.onnx) and describe it in
    the manifest, so that the model can add items after training (POST /items).
    ``candidate_features`` names the model's F feature columns with their defaults (the
    manifest's field of that name); ``write_more(folder)`` adds files the service does not
    read (the recall channels of ``rerank recall``) before the folder is renamed into place.
    """
    model = model.eval()
    feats = [dict(f) for f in candidate_features or ()]
    if len(feats) != model.cfg.n_feats or [f["default"] for f in feats] != list(
        model.cfg.feat_defaults
    ):
        raise ValueError(
            f"candidate_features {feats} do not match the model's {model.cfg.n_feats} "
            f"features with defaults {list(model.cfg.feat_defaults)}"
        )
    vectors = model.tower.all_vectors().numpy().astype(VECTOR_DTYPE)  # (n_items, D)
    if vectors.shape[0] != len(item_ids):
        raise ValueError(f"{len(item_ids)} item ids for {vectors.shape[0]} vectors")
    final = models_dir / version
    if final.exists():
        raise FileExistsError(f"{final} exists: pick a new version, versions are immutable")
    with publish_folder(final) as tmp:
        export_onnx(model, tmp / ONNX_FILE)
        np.save(tmp / VECTORS_FILE, vectors)
        (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in item_ids))
        hashes = file_hashes(tmp)
        if tower is not None:
            export_item_tower(model, tmp / tower.file)
            hashes[tower.file] = sha256_file(tmp / tower.file)
        if write_more is not None:
            write_more(tmp)
        manifest = Manifest(
            version=version,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            dim=model.cfg.dim,
            history_len=model.cfg.history_len,
            vector_dtype=VECTOR_DTYPE,
            n_items=len(item_ids),
            opset=OPSET,
            inputs=graph_inputs(model.cfg),
            outputs=OUTPUTS,
            candidate_features=tuple(feats) or None,
            sha256=hashes,
            model_config=model.cfg.to_dict(),
            item_tower=tower.to_dict() if tower is not None else None,
            extra=dict(extra or {}),
        )
        write_manifest(manifest, tmp)
    return final


def random_model(cfg: ModelConfig, seed: int = 0) -> Reranker:
    """An untrained model over random item features: for tests of the export and the service."""
    gen = torch.Generator().manual_seed(seed)
    n = cfg.n_items

    def table(width: int) -> torch.Tensor:
        t = torch.randn(n, width, generator=gen)
        t[0] = 0.0
        return t

    torch.manual_seed(seed)
    tower = ItemTower(
        cfg, table(cfg.text_dim), table(cfg.n_attrs), table(cfg.n_cf), table(cfg.n_stats)
    )
    return Reranker(cfg, tower).eval()


def export_random_model(
    models_dir: Path,
    n_items: int = 200,
    dim: int = 16,
    history_len: int = 8,
    version: str = "test-random",
    seed: int = 0,
    item_ids: list[str] | None = None,
    candidate_features: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Export an untrained model over ``item_ids``, by default "1".."n_items" (for tests; no
    data needed); with ``candidate_features`` (``[{"name", "default"}, ...]``) it declares
    ``cand_feats``."""
    feats = list(candidate_features or ())
    cfg = ModelConfig(
        n_items=n_items + 1,
        dim=dim,
        history_len=history_len,
        text_dim=8,
        n_cf=4,
        n_heads=2,
        n_layers=1,
        hidden=32,
        n_feats=len(feats),
        feat_defaults=tuple(float(f["default"]) for f in feats),
    )
    model = random_model(cfg, seed)
    ids = [str(i) for i in range(1, n_items + 1)] if item_ids is None else list(item_ids)
    if len(ids) != n_items:
        raise ValueError(f"item_ids: {len(ids)} ids for n_items={n_items}")
    return export_model(
        model, ids, models_dir, version, {"dataset": "random"}, candidate_features=feats
    )
