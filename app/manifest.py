"""Read and verify a model folder (``models/<version>/``) against its manifest.

A model is only ever served with the vectors it was exported with: the manifest names the
dim, the dtype and the sha256 of every file, and anything that does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import ManifestMismatch

VECTOR_DTYPES = ("float16", "float32")
REQUIRED_FILES = ("model.onnx", "item_vectors.npy", "item_ids.txt")
# The text encoder of new items, shared by every version: models/encoder/ (app/encoder.py).
ENCODER_DIR = "encoder"
# Names under models/ that are not model versions: the default pointer and the text encoder.
RESERVED_NAMES = ("DEFAULT", ENCODER_DIR)


@dataclass(frozen=True)
class Manifest:
    version: str
    dim: int
    history_len: int
    vector_dtype: str
    n_items: int
    sha256: dict[str, str]
    raw: dict[str, Any]

    @property
    def wire_dtype(self) -> np.dtype[Any]:
        """The dtype of a vector in Redis: little-endian, whatever the host."""
        return np.dtype(self.vector_dtype).newbyteorder("<")

    @property
    def vector_bytes(self) -> int:
        return self.dim * self.wire_dtype.itemsize


def parse_manifest(data: dict[str, Any], where: str) -> Manifest:
    """Check the fields the service relies on; ``where`` names the source in errors."""
    try:
        m = Manifest(
            version=str(data["version"]),
            dim=int(data["dim"]),
            history_len=int(data["history_len"]),
            vector_dtype=str(data["vector_dtype"]),
            n_items=int(data["n_items"]),
            sha256=dict(data["sha256"]),
            raw=data,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestMismatch(f"{where}: missing or invalid field {exc}") from exc
    if m.dim < 1 or m.history_len < 1 or m.n_items < 1:
        raise ManifestMismatch(f"{where}: dim, history_len and n_items must be positive")
    if m.vector_dtype not in VECTOR_DTYPES:
        raise ManifestMismatch(f"{where}: vector_dtype={m.vector_dtype!r} not in {VECTOR_DTYPES}")
    missing = [f for f in REQUIRED_FILES if f not in m.sha256]
    if missing:
        raise ManifestMismatch(f"{where}: no sha256 for {missing}")
    return m


def read_manifest(folder: Path) -> Manifest:
    path = folder / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestMismatch(f"{path}: cannot read manifest ({exc})") from exc
    return parse_manifest(data, str(path))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_folder(folder: Path) -> Manifest:
    """Read the manifest and check hashes, vector shape and dtype, and the id count."""
    m = read_manifest(folder)
    if folder.name != m.version:
        raise ManifestMismatch(f"{folder}: folder name differs from version {m.version!r}")
    for name, expected in m.sha256.items():
        path = folder / name
        if not path.is_file():
            raise ManifestMismatch(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise ManifestMismatch(f"{path}: sha256 differs from the manifest")
    vectors = np.load(folder / "item_vectors.npy", mmap_mode="r")
    if vectors.shape != (m.n_items, m.dim):
        raise ManifestMismatch(
            f"{folder}: item_vectors.npy is {vectors.shape}, manifest says ({m.n_items}, {m.dim})"
        )
    if vectors.dtype != np.dtype(m.vector_dtype):
        raise ManifestMismatch(
            f"{folder}: item_vectors.npy is {vectors.dtype}, manifest says {m.vector_dtype}"
        )
    if len(read_item_ids(folder)) != m.n_items:
        raise ManifestMismatch(f"{folder}: item_ids.txt does not hold {m.n_items} ids")
    return m


def read_item_ids(folder: Path) -> list[str]:
    return (folder / "item_ids.txt").read_text().splitlines()


def check_same(local: Manifest, remote: Manifest) -> None:
    """The Redis copy of a manifest must describe exactly the local files."""
    for field in ("version", "dim", "history_len", "vector_dtype", "n_items", "sha256"):
        if getattr(local, field) != getattr(remote, field):
            raise ManifestMismatch(
                f"version {local.version}: {field} in Redis differs from the local manifest"
            )


def default_version(models_dir: Path) -> str | None:
    """The default model: named in ``models/DEFAULT``, else the newest folder by name.

    ``models/encoder/`` (the text encoder shared by every version) is never a version.
    """
    pointer = models_dir / "DEFAULT"
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
        and (p / "manifest.json").is_file()
    )
    return folders[-1] if folders else None
