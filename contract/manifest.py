"""A model folder, ``models/<version>/``, and the manifest that describes it.

A model is only ever served with the vectors it was exported with: the manifest names the
dim, the dtype and the sha256 of every file, and anything that does not match is refused.
The exporter writes the manifest through ``write_manifest`` and the service and the loader
read it through ``read_manifest`` and ``verify_folder``, so both sides check the same rules.

``manifest.json``, keys in this order (what ``Manifest.to_dict`` writes)::

    version        str     the folder's name; a leading dot marks an export in progress
    created_at     str     ISO 8601, UTC (optional)
    dim            int     D, the length of an item vector
    history_len    int     L, the longest history the model reads
    vector_dtype   str     float16 or float32: item_vectors.npy, and the vectors in Redis
    n_items        int     rows of item_vectors.npy, lines of item_ids.txt
    opset          int     the ONNX opset of model.onnx (optional)
    inputs         [str]   the graph's input names (optional; see contract/graph.py)
    outputs        [str]   the graph's output names (optional)
    candidate_features [{"name": str, "default": number}]  the columns of ``cand_feats``,
                   in order, and the value each takes when a candidate does not carry it
                   (optional; present exactly when ``inputs`` holds ``cand_feats``)
    sha256         {file: hex digest} of model.onnx, item_vectors.npy and item_ids.txt
    model_config   {...}   the model's hyper-parameters (optional)
    item_tower     {...}   the item tower of new items (optional; contract/items.py): its
                           file, which must be in sha256, and how raw attributes become its
                           inputs. A model without it cannot add items (POST /items).
    ...            any other key (dataset, training, offline_metrics) is kept as it is
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contract.graph import CAND_FEATS, KNOWN_INPUTS, OUTPUTS, REQUIRED_INPUTS
from contract.items import ItemTowerSpec

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
VECTORS_FILE = "item_vectors.npy"
IDS_FILE = "item_ids.txt"
HASHED_FILES = (ONNX_FILE, VECTORS_FILE, IDS_FILE)
VECTOR_DTYPES = ("float16", "float32")
DEFAULT_FILE = "DEFAULT"  # models/DEFAULT names the default version
# Sample users for the /demo page (app/demo.py, written by training/demo.py); optional.
DEMO_FILE = "demo.json"

# The keys the dataclass holds as fields, in the order they are written.
_FIELDS = (
    "version",
    "created_at",
    "dim",
    "history_len",
    "vector_dtype",
    "n_items",
    "opset",
    "inputs",
    "outputs",
    "candidate_features",
    "sha256",
    "model_config",
    "item_tower",
)
_REQUIRED = ("version", "dim", "history_len", "vector_dtype", "n_items", "sha256")
# What must agree between two copies of one version's manifest (a folder and Redis).
_IDENTITY = ("version", "dim", "history_len", "vector_dtype", "n_items", "sha256")


class ManifestError(ValueError):
    """A model folder or a manifest breaks the contract; the message names the field or file."""


@dataclass(frozen=True)
class Manifest:
    """The manifest of one model version; a constructed one has passed every field check."""

    version: str
    dim: int
    history_len: int
    vector_dtype: str
    n_items: int
    sha256: dict[str, str]
    created_at: str | None = None
    opset: int | None = None
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    candidate_features: tuple[dict[str, Any], ...] | None = None
    model_config: dict[str, Any] | None = None
    item_tower: dict[str, Any] | None = None  # as read; ``tower`` is the checked form
    extra: dict[str, Any] = field(default_factory=dict)  # every other key, as read

    def __post_init__(self) -> None:
        _check(self.__dict__, "manifest")
        clash = [k for k in self.extra if k in _FIELDS]
        if clash:
            raise ManifestError(f"manifest: extra holds {clash}, which are fields of their own")

    @property
    def tower(self) -> ItemTowerSpec | None:
        """The item tower of new items, or None for a model without one."""
        if self.item_tower is None:
            return None
        return ItemTowerSpec.from_dict(self.item_tower)  # checked at construction

    @property
    def feature_names(self) -> list[str]:
        """The names of the ``cand_feats`` columns, in order; empty without features."""
        return [str(f["name"]) for f in self.candidate_features or ()]

    @property
    def feature_defaults(self) -> list[float]:
        """The value of each ``cand_feats`` column for a candidate that lacks it."""
        return [float(f["default"]) for f in self.candidate_features or ()]

    @property
    def wire_dtype(self) -> np.dtype[Any]:
        """The dtype of a vector in Redis: little-endian, whatever the host."""
        return np.dtype(self.vector_dtype).newbyteorder("<")

    @property
    def vector_bytes(self) -> int:
        return self.dim * self.wire_dtype.itemsize

    @classmethod
    def from_dict(cls, data: object, where: str) -> Manifest:
        """Check a decoded manifest; ``where`` names its source in the errors."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: a manifest is a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ManifestError(f"{where}: missing field {', '.join(missing)}")
        _check(data, where)
        known = {k: data[k] for k in _FIELDS if k in data}
        for key in ("inputs", "outputs", "candidate_features"):
            if key in known and known[key] is not None:
                known[key] = tuple(known[key])
        extra = {k: v for k, v in data.items() if k not in _FIELDS}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"{where}: not JSON ({exc})") from exc
        return cls.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data: known keys in their order (absent ones left out), then
        the other keys as read. ``from_dict(m.to_dict())`` gives back ``m``."""
        out: dict[str, Any] = {}
        for key in _FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out | self.extra

    def to_json(self, indent: int | None = None) -> str:
        """The manifest as JSON text: compact (the Redis copy), or indented (the file)."""
        return json.dumps(self.to_dict(), indent=indent)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(data: dict[str, Any], where: str) -> None:
    """Every field present in ``data`` has its type and range; errors name the field."""

    def fail(key: str, rule: str) -> ManifestError:
        return ManifestError(f"{where}: {key} {rule}, got {data[key]!r}")

    version = data["version"]
    if not isinstance(version, str) or not version or "/" in version or version[0] == ".":
        raise fail("version", "must be a folder name (not empty, no '/', no leading dot)")
    for key in ("dim", "history_len", "n_items"):
        if not _is_int(data[key]) or data[key] < 1:
            raise fail(key, "must be a positive integer")
    if data["vector_dtype"] not in VECTOR_DTYPES:
        raise fail("vector_dtype", f"must be one of {', '.join(VECTOR_DTYPES)}")
    sha256 = data["sha256"]
    if not isinstance(sha256, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sha256.items()
    ):
        raise fail("sha256", "must map file names to hex digests")
    absent = [f for f in HASHED_FILES if f not in sha256]
    if absent:
        raise ManifestError(f"{where}: sha256: no sha256 for {absent}")
    if data.get("created_at") is not None and not isinstance(data["created_at"], str):
        raise fail("created_at", "must be a string")
    if data.get("opset") is not None and (not _is_int(data["opset"]) or data["opset"] < 1):
        raise fail("opset", "must be a positive integer")
    _check_names(data, "inputs", REQUIRED_INPUTS, KNOWN_INPUTS, where)
    _check_names(data, "outputs", OUTPUTS, OUTPUTS, where)
    _check_features(data, where)
    if data.get("model_config") is not None and not isinstance(data["model_config"], dict):
        raise fail("model_config", "must be an object")
    if data.get("item_tower") is not None:
        try:
            tower = ItemTowerSpec.from_dict(data["item_tower"])
        except ValueError as exc:
            raise ManifestError(f"{where}: item_tower: {exc}") from None
        if tower.file not in sha256:
            raise ManifestError(f"{where}: item_tower: no sha256 for {tower.file}")
        if tower.dim != data["dim"]:
            raise ManifestError(f"{where}: item_tower: dim {tower.dim} differs from dim")


def _check_names(
    data: dict[str, Any],
    key: str,
    required: tuple[str, ...],
    known: tuple[str, ...],
    where: str,
) -> None:
    names = data.get(key)
    if names is None:
        return
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ManifestError(f"{where}: {key} must be a list of names, got {names!r}")
    lacking = [n for n in required if n not in names]
    unknown = [n for n in names if n not in known]
    if lacking or unknown:
        raise ManifestError(
            f"{where}: {key} {list(names)} lack {lacking} or hold unknown {unknown} "
            f"(known: {list(known)})"
        )


def _check_features(data: dict[str, Any], where: str) -> None:
    """``candidate_features``: objects of a name and a finite default, names unique; present
    exactly when the declared inputs hold ``cand_feats`` (a manifest without ``inputs`` is
    not cross-checked)."""
    feats = data.get("candidate_features")
    inputs = data.get("inputs")
    if feats is not None:
        if not isinstance(feats, list | tuple) or not feats:
            raise ManifestError(
                f"{where}: candidate_features must be a non-empty list of "
                f'{{"name", "default"}} objects, got {feats!r}'
            )
        seen: set[str] = set()
        for i, f in enumerate(feats):
            ok = isinstance(f, dict) and set(f) == {"name", "default"}
            name = f.get("name") if ok else None
            default = f.get("default") if ok else None
            if not (isinstance(name, str) and name) or not (
                isinstance(default, int | float)
                and not isinstance(default, bool)
                and math.isfinite(default)
            ):
                raise ManifestError(
                    f"{where}: candidate_features[{i}] must be "
                    f'{{"name": non-empty string, "default": finite number}}, got {f!r}'
                )
            if name in seen:
                raise ManifestError(f"{where}: candidate_features: {name!r} appears twice")
            seen.add(name)
    if inputs is not None and isinstance(inputs, list | tuple):
        if CAND_FEATS in inputs and feats is None:
            raise ManifestError(
                f"{where}: inputs hold {CAND_FEATS} but candidate_features is absent"
            )
        if feats is not None and CAND_FEATS not in inputs:
            raise ManifestError(
                f"{where}: candidate_features is given but inputs lack {CAND_FEATS}"
            )


def read_manifest(folder: Path) -> Manifest:
    """``folder/manifest.json``, checked field by field (not against the files: see
    ``verify_folder``)."""
    path = folder / MANIFEST_FILE
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from exc
    return Manifest.from_json(text, str(path))


def write_manifest(manifest: Manifest, folder: Path) -> Path:
    """``folder/manifest.json``: indented by two, one trailing newline."""
    path = folder / MANIFEST_FILE
    path.write_text(manifest.to_json(indent=2) + "\n")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_bad_file(folder: Path, expected: Mapping[str, str]) -> tuple[Path, bool] | None:
    """The first of ``expected``'s files (name -> sha256) under ``folder`` that is missing
    (``(path, False)``) or whose sha256 differs (``(path, True)``); None when all match."""
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return path, False
        if sha256_file(path) != digest:
            return path, True
    return None


def file_hashes(folder: Path) -> dict[str, str]:
    """The ``sha256`` field of a folder's files, as the exporter writes it."""
    return {name: sha256_file(folder / name) for name in HASHED_FILES}


def read_item_ids(folder: Path) -> list[str]:
    """External item ids; line ``i`` names row ``i`` of item_vectors.npy."""
    return (folder / IDS_FILE).read_text().splitlines()


def verify_folder(folder: Path) -> Manifest:
    """Read the manifest and check hashes, vector shape and dtype, and the id count."""
    m = read_manifest(folder)
    if folder.name != m.version:
        raise ManifestError(f"{folder}: folder name differs from version {m.version!r}")
    bad = first_bad_file(folder, m.sha256)
    if bad is not None:
        path, present = bad
        what = (
            "sha256 differs from the manifest" if present else "listed in the manifest but missing"
        )
        raise ManifestError(f"{path}: {what}")
    vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
    if vectors.shape != (m.n_items, m.dim):
        raise ManifestError(
            f"{folder}: {VECTORS_FILE} is {vectors.shape}, manifest says ({m.n_items}, {m.dim})"
        )
    if vectors.dtype != np.dtype(m.vector_dtype):
        raise ManifestError(
            f"{folder}: {VECTORS_FILE} is {vectors.dtype}, manifest says {m.vector_dtype}"
        )
    if len(read_item_ids(folder)) != m.n_items:
        raise ManifestError(f"{folder}: {IDS_FILE} does not hold {m.n_items} ids")
    return m


def check_same(local: Manifest, copy: Manifest, where: str) -> None:
    """A copy of a manifest held elsewhere (``where``: Redis) describes exactly the local
    files: same version, shape, dtype and hashes."""
    for key in _IDENTITY:
        if getattr(local, key) != getattr(copy, key):
            raise ManifestError(
                f"version {local.version}: {key} in {where} differs from the local manifest"
            )


# The text encoder of new items, shared by every version: models/encoder/ (app/encoder.py).
ENCODER_DIR = "encoder"
# Names under models/ that are not model versions: the default pointer and the text encoder.
RESERVED_NAMES = (DEFAULT_FILE, ENCODER_DIR)


def default_version(models_dir: Path) -> str | None:
    """The default model: named in ``models/DEFAULT``, else the newest folder by name.

    ``models/encoder/`` (the text encoder shared by every version) is never a version.
    """
    pointer = models_dir / DEFAULT_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name:
            return name
    folders = sorted(
        p.name
        for p in models_dir.glob("*")
        # a leading dot marks an export still being written
        if not p.name.startswith(".")
        and p.name not in RESERVED_NAMES
        and (p / MANIFEST_FILE).is_file()
    )
    return folders[-1] if folders else None
