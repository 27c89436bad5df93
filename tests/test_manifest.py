"""The model contract's manifest: fields checked by name, folders verified, the JSON kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contract import (
    RESERVED_NAMES,
    Manifest,
    ManifestError,
    check_same,
    default_version,
    read_manifest,
    sha256_file,
    verify_folder,
    write_manifest,
)
from tests.conftest import VERSION_A, VERSION_B

COMMITTED = Path(__file__).resolve().parents[1] / "models"


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
    assert m.inputs == ("hist", "hist_mask", "cand", "cand_mask", "cand_rank")
    assert m.outputs == ("scores", "attn")
    assert m.extra == {"dataset": "random"}


@pytest.mark.parametrize("name", ["model.onnx", "item_vectors.npy", "item_ids.txt"])
def test_a_changed_file_is_refused(model_dir: Path, tmp_path: Path, name: str) -> None:
    folder = copy(model_dir, tmp_path)
    with (folder / name).open("ab") as f:
        f.write(b"\n")
    with pytest.raises(ManifestError, match="sha256"):
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
    with pytest.raises(ManifestError, match=message):
        verify_folder(folder)


def test_vectors_of_another_shape_are_refused(model_dir: Path, tmp_path: Path) -> None:
    folder = copy(model_dir, tmp_path)
    np.save(folder / "item_vectors.npy", np.zeros((200, 8), np.float16))
    data = json.loads((folder / "manifest.json").read_text())
    data["sha256"]["item_vectors.npy"] = sha256_file(folder / "item_vectors.npy")
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"\(200, 8\)"):
        verify_folder(folder)


def good() -> dict[str, Any]:
    return {
        "version": "v1",
        "dim": 4,
        "history_len": 3,
        "vector_dtype": "float16",
        "n_items": 2,
        "sha256": {f: "0" * 64 for f in ("model.onnx", "item_vectors.npy", "item_ids.txt")},
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dim": "4"}, "dim must be a positive integer, got '4'"),
        ({"dim": 0}, "dim must be a positive integer"),
        ({"history_len": True}, "history_len must be a positive integer"),
        ({"n_items": 2.5}, "n_items must be a positive integer"),
        ({"version": ""}, "version must be a folder name"),
        ({"version": "a/b"}, "version must be a folder name"),
        ({"version": ".v1.tmp"}, "version must be a folder name"),
        ({"vector_dtype": "int8"}, "vector_dtype must be one of float16, float32"),
        ({"sha256": ["model.onnx"]}, "sha256 must map file names"),
        ({"sha256": {"model.onnx": "0"}}, r"sha256: no sha256 for \['item_vectors.npy'"),
        ({"opset": "17"}, "opset must be a positive integer"),
        ({"created_at": 5}, "created_at must be a string"),
        ({"inputs": ["hist", "cand", "cand_mask"]}, r"inputs .* lack \['hist_mask'\]"),
        ({"inputs": "hist"}, "inputs must be a list of names"),
        (
            {"inputs": ["hist", "hist_mask", "cand", "cand_mask", "price"]},
            r"inputs .* hold unknown \['price'\]",
        ),
        ({"outputs": ["scores"]}, r"outputs .* lack \['attn'\]"),
        ({"model_config": [1]}, "model_config must be an object"),
    ],
)
def test_a_bad_field_is_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=f"^here: {message}"):
        Manifest.from_dict(good() | fields, "here")


def test_a_missing_field_or_a_non_object_is_named() -> None:
    data = good()
    del data["n_items"], data["dim"]
    with pytest.raises(ManifestError, match="here: missing field dim, n_items"):
        Manifest.from_dict(data, "here")
    with pytest.raises(ManifestError, match="here: a manifest is a JSON object, got list"):
        Manifest.from_dict([], "here")
    with pytest.raises(ManifestError, match="here: not JSON"):
        Manifest.from_json(b"{", "here")


def test_an_optional_input_is_accepted() -> None:
    names = ["hist", "hist_mask", "cand", "cand_mask", "cand_feats"]
    feats = [{"name": "f", "default": 0.0}]  # cand_feats comes with its columns
    data = good() | {"inputs": names, "candidate_features": feats}
    assert Manifest.from_dict(data, "here").inputs == tuple(names)


def test_the_constructor_checks_too() -> None:
    fields = good()
    with pytest.raises(ManifestError, match="dim must be a positive integer"):
        Manifest(**(fields | {"dim": -1}))
    with pytest.raises(ManifestError, match=r"extra holds \['dim'\]"):
        Manifest(**fields, extra={"dim": 5})


def test_json_round_trip_keeps_every_key() -> None:
    data = good() | {"created_at": "2026-01-01T00:00:00+00:00", "opset": 17, "dataset": "x",
                     "training": {"seed": 0}}  # fmt: skip
    m = Manifest.from_dict(data, "here")
    assert m.extra == {"dataset": "x", "training": {"seed": 0}}
    assert m.to_dict() == data
    assert Manifest.from_json(m.to_json(), "again") == m
    assert list(m.to_dict())[:3] == ["version", "created_at", "dim"]  # the file's key order


def test_written_manifest_is_the_exported_text(model_dir: Path, tmp_path: Path) -> None:
    """Reading and writing back leaves manifest.json byte for byte as the exporter wrote it."""
    text = (model_dir / VERSION_A / "manifest.json").read_text()
    folder = tmp_path / VERSION_A
    folder.mkdir()
    write_manifest(read_manifest(model_dir / VERSION_A), folder)
    assert (folder / "manifest.json").read_text() == text


@pytest.mark.parametrize(
    "folder",
    sorted(
        p.parent
        for p in COMMITTED.glob("*/manifest.json")
        if p.parent.name not in RESERVED_NAMES  # the text encoder has its own manifest
    ),
    ids=lambda p: p.name,
)
def test_committed_models_verify_and_keep_their_text(folder: Path, tmp_path: Path) -> None:
    m = verify_folder(folder)
    write_manifest(m, tmp_path)
    assert (tmp_path / "manifest.json").read_text() == (folder / "manifest.json").read_text()


def test_check_same(model_dir: Path) -> None:
    a, b = read_manifest(model_dir / VERSION_A), read_manifest(model_dir / VERSION_B)
    check_same(a, a, "Redis")
    with pytest.raises(ManifestError, match=f"version {VERSION_A}: version in Redis differs"):
        check_same(a, b, "Redis")
    other = Manifest.from_dict(b.to_dict() | {"version": a.version}, "copy")
    with pytest.raises(ManifestError, match=f"version {VERSION_A}: sha256 in Redis differs"):
        check_same(a, other, "Redis")


def test_default_version(tmp_path: Path) -> None:
    assert default_version(tmp_path) is None
    for name in ("v1", "v3", "v2", ".v9.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    assert default_version(tmp_path) == "v3"  # newest by name; half-written exports skipped
    (tmp_path / "DEFAULT").write_text("v1\n")
    assert default_version(tmp_path) == "v1"


_FEATS = [{"name": "ease_rank", "default": 1000.0}, {"name": "ease_score", "default": 0}]
_WITH_FEATS = ["hist", "hist_mask", "cand", "cand_mask", "cand_rank", "cand_feats"]


def _data(model_dir: Path, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((model_dir / VERSION_A / "manifest.json").read_text())
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def test_candidate_features_round_trip(model_dir: Path) -> None:
    data = _data(model_dir, inputs=_WITH_FEATS, candidate_features=_FEATS)
    m = Manifest.from_dict(data, "m")
    assert m.feature_names == ["ease_rank", "ease_score"]
    assert m.feature_defaults == [1000.0, 0.0]
    assert Manifest.from_dict(m.to_dict(), "again") == m
    assert list(m.to_dict()).index("candidate_features") < list(m.to_dict()).index("sha256")
    old = Manifest.from_dict(_data(model_dir), "old")  # a manifest from before features
    assert old.candidate_features is None and old.feature_names == []


@pytest.mark.parametrize(
    ("feats", "inputs", "message"),
    [
        ([], _WITH_FEATS, "non-empty list"),
        ({"ease_rank": 1000}, _WITH_FEATS, "non-empty list"),
        ([{"name": "", "default": 1.0}], _WITH_FEATS, r"candidate_features\[0\]"),
        ([{"name": "a", "default": True}], _WITH_FEATS, r"candidate_features\[0\]"),
        ([{"name": "a", "default": "1"}], _WITH_FEATS, r"candidate_features\[0\]"),
        ([{"name": "a", "default": float("nan")}], _WITH_FEATS, r"candidate_features\[0\]"),
        ([{"name": "a"}], _WITH_FEATS, r"candidate_features\[0\]"),
        ([{"name": "a", "default": 1, "x": 2}], _WITH_FEATS, r"candidate_features\[0\]"),
        ([{"name": "a", "default": 1}, {"name": "a", "default": 2}], _WITH_FEATS, "twice"),
        (_FEATS, _WITH_FEATS[:-1], "inputs lack cand_feats"),
        (None, _WITH_FEATS, "candidate_features is absent"),
    ],
)
def test_candidate_features_are_checked(
    model_dir: Path, feats: Any, inputs: list[str], message: str
) -> None:
    data = _data(model_dir, inputs=inputs, candidate_features=feats)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data, "m")
