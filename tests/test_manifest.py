"""Model folders: verified against their manifest; the default version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.errors import ManifestMismatch
from app.manifest import check_same, default_version, read_manifest, verify_folder
from tests.conftest import VERSION_A, VERSION_B


def copy(model_dir: Path, tmp_path: Path, version: str = VERSION_A) -> Path:
    return Path(shutil.copytree(model_dir / version, tmp_path / version))


def test_a_good_folder(model_dir: Path) -> None:
    m = verify_folder(model_dir / VERSION_A)
    assert (m.version, m.dim, m.history_len, m.vector_dtype, m.n_items) == (
        VERSION_A,
        16,
        8,
        "float16",
        200,
    )
    assert m.vector_bytes == 32


@pytest.mark.parametrize("name", ["model.onnx", "item_vectors.npy", "item_ids.txt"])
def test_a_changed_file_is_refused(model_dir: Path, tmp_path: Path, name: str) -> None:
    folder = copy(model_dir, tmp_path)
    with (folder / name).open("ab") as f:
        f.write(b"\n")
    with pytest.raises(ManifestMismatch, match="sha256"):
        verify_folder(folder)


def rewrite(folder: Path, **fields: object) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dim": 32}, "item_vectors.npy is"),
        ({"vector_dtype": "float32"}, "float16, manifest says float32"),
        ({"vector_dtype": "int8"}, "vector_dtype"),
        ({"n_items": 199}, "item_vectors.npy is"),
        ({"version": "other"}, "folder name"),
        ({"sha256": {}}, "no sha256"),
    ],
)
def test_a_wrong_manifest_is_refused(
    model_dir: Path, tmp_path: Path, fields: dict[str, object], message: str
) -> None:
    folder = copy(model_dir, tmp_path)
    rewrite(folder, **fields)
    with pytest.raises(ManifestMismatch, match=message):
        verify_folder(folder)


def test_vectors_of_another_shape_are_refused(model_dir: Path, tmp_path: Path) -> None:
    folder = copy(model_dir, tmp_path)
    np.save(folder / "item_vectors.npy", np.zeros((200, 8), np.float16))
    data = json.loads((folder / "manifest.json").read_text())
    from app.manifest import sha256_file

    data["sha256"]["item_vectors.npy"] = sha256_file(folder / "item_vectors.npy")
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestMismatch, match=r"\(200, 8\)"):
        verify_folder(folder)


def test_check_same(model_dir: Path) -> None:
    a, b = read_manifest(model_dir / VERSION_A), read_manifest(model_dir / VERSION_B)
    check_same(a, a)
    with pytest.raises(ManifestMismatch):
        check_same(a, b)


def test_default_version(tmp_path: Path) -> None:
    assert default_version(tmp_path) is None
    for name in ("v1", "v3", "v2", ".v9.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    assert default_version(tmp_path) == "v3"  # newest by name; half-written exports skipped
    (tmp_path / "DEFAULT").write_text("v1\n")
    assert default_version(tmp_path) == "v1"
