"""`rerank load`: put a model version's vectors and manifest into Redis, then activate it.

Order matters for the services watching ``rr:active``: every vector first, then a check that
all of them are there with the right size, then the manifest, and only then the pointer. A
service that sees the new version therefore always finds its vectors. Writing the same
version twice writes the same bytes (idempotent); a different model under a version that is
already loaded is refused, since versions are immutable.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import redis

from app.errors import ManifestMismatch
from app.manifest import Manifest, check_same, parse_manifest, read_item_ids, verify_folder
from app.store import Keys

log = logging.getLogger(__name__)

CHUNK = 1000  # keys per pipelined MSET / EXISTS: big enough to amortise, small for Redis


def load_model(
    redis_url: str, model_path: Path, prefix: str = "rr", activate: bool = True
) -> Manifest:
    """Load ``model_path`` (a verified model folder) into Redis under its version."""
    manifest = verify_folder(model_path)
    keys = Keys(prefix)
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        _refuse_other_model(client, keys, manifest)
        ids = read_item_ids(model_path)
        vectors = np.load(model_path / "item_vectors.npy")  # (n_items, D)
        _write_vectors(client, keys, manifest, ids, vectors)
        _verify(client, keys, manifest, ids)
        client.set(keys.manifest(manifest.version), json.dumps(manifest.raw))
        if activate:
            client.set(keys.active, manifest.version)
    finally:
        client.close()
    log.info(
        "loaded %s: %d vectors of dim %d%s",
        manifest.version,
        manifest.n_items,
        manifest.dim,
        ", active" if activate else "",
    )
    return manifest


def activate(redis_url: str, version: str, prefix: str = "rr") -> None:
    """Point ``rr:active`` at an already loaded version."""
    keys = Keys(prefix)
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        if not client.exists(keys.manifest(version)):
            raise ManifestMismatch(f"version {version} is not loaded")
        client.set(keys.active, version)
    finally:
        client.close()


def _refuse_other_model(client: redis.Redis, keys: Keys, manifest: Manifest) -> None:
    raw = client.get(keys.manifest(manifest.version))
    if raw is not None:
        check_same(manifest, parse_manifest(json.loads(raw), "redis manifest"))


def _write_vectors(
    client: redis.Redis, keys: Keys, m: Manifest, ids: list[str], vectors: np.ndarray
) -> None:
    # One contiguous little-endian buffer, sliced per row: no per-dimension Python work.
    data = np.ascontiguousarray(vectors, dtype=m.wire_dtype).tobytes()
    size = m.vector_bytes
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        mapping = {
            keys.vector(m.version, item_id): data[(start + j) * size : (start + j + 1) * size]
            for j, item_id in enumerate(chunk)
        }
        client.mset(mapping)


def _verify(client: redis.Redis, keys: Keys, m: Manifest, ids: list[str]) -> None:
    found = 0
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(ids), CHUNK):
        pipe.exists(*(keys.vector(m.version, i) for i in ids[start : start + CHUNK]))
    for count in pipe.execute():
        found += int(count)
    if found != m.n_items:
        raise ManifestMismatch(f"{m.version}: {found} of {m.n_items} vectors in Redis")
    sample = [ids[0], ids[len(ids) // 2], ids[-1]]
    pipe = client.pipeline(transaction=False)
    for item_id in sample:
        pipe.strlen(keys.vector(m.version, item_id))
    sizes = pipe.execute()
    if any(int(s) != m.vector_bytes for s in sizes):
        raise ManifestMismatch(f"{m.version}: vectors in Redis are not {m.vector_bytes} bytes")
