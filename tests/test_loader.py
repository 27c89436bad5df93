"""Loader: vectors, manifest, then the active pointer; idempotent; refuses mismatches."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from app.embedded import EmbeddedRedis
from app.errors import VersionRefused
from app.loader import activate, load_into_redis
from contract import ManifestError
from tests.conftest import VERSION_A, VERSION_B


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_load_writes_vectors_manifest_and_pointer(
    redis_server: EmbeddedRedis, r: redis.Redis, prefix: str, model_dir: Path
) -> None:
    m = load_into_redis(redis_server.url, model_dir / VERSION_A, prefix)
    assert r.get(f"{prefix}:active") == VERSION_A.encode()
    assert json.loads(r.get(f"{prefix}:m:{VERSION_A}") or b"")["sha256"] == m.sha256
    keys = list(r.scan_iter(f"{prefix}:v:{VERSION_A}:*", count=1000))
    assert len(keys) == m.n_items
    table = np.load(model_dir / VERSION_A / "item_vectors.npy")
    raw = r.get(f"{prefix}:v:{VERSION_A}:17") or b""
    np.testing.assert_array_equal(np.frombuffer(raw, "<f2"), table[16])  # "17" is row 16


def test_load_is_idempotent_and_can_skip_activation(
    redis_server: EmbeddedRedis, r: redis.Redis, prefix: str, model_dir: Path
) -> None:
    load_into_redis(redis_server.url, model_dir / VERSION_A, prefix)
    load_into_redis(redis_server.url, model_dir / VERSION_A, prefix)
    load_into_redis(redis_server.url, model_dir / VERSION_B, prefix, activate=False)
    assert r.get(f"{prefix}:active") == VERSION_A.encode()
    assert len(list(r.scan_iter(f"{prefix}:v:{VERSION_A}:*", count=1000))) == 200
    activate(redis_server.url, VERSION_B, prefix)
    assert r.get(f"{prefix}:active") == VERSION_B.encode()
    with pytest.raises(VersionRefused, match="not loaded"):
        activate(redis_server.url, "never-loaded", prefix)


def test_a_tampered_folder_writes_nothing(
    redis_server: EmbeddedRedis, r: redis.Redis, prefix: str, model_dir: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(model_dir / VERSION_A, tmp_path / VERSION_A))
    with (folder / "item_vectors.npy").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(ManifestError, match="sha256"):
        load_into_redis(redis_server.url, folder, prefix)
    assert r.get(f"{prefix}:active") is None
    assert not list(r.scan_iter(f"{prefix}:*"))


def test_another_model_under_a_loaded_version_is_refused(
    redis_server: EmbeddedRedis, r: redis.Redis, prefix: str, model_dir: Path, tmp_path: Path
) -> None:
    load_into_redis(redis_server.url, model_dir / VERSION_A, prefix)
    impostor = Path(shutil.copytree(model_dir / VERSION_B, tmp_path / VERSION_A))
    data = json.loads((impostor / "manifest.json").read_text())
    data["version"] = VERSION_A
    (impostor / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="sha256 in Redis differs"):
        load_into_redis(redis_server.url, impostor, prefix)
