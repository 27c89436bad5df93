"""`rerank load`: put a model version's vectors and manifest into Redis, then activate it.

Order matters for the services watching ``rr:active``: every vector first, then a check that
every one of them is there with the right size, then the manifest, and only then the pointer.
A service that sees the new version therefore always finds its vectors. A load that fails
on the way (Redis full at maxmemory, gone, or wrong) raises ``LoadFailed`` with the reason,
leaves ``rr:active`` where it was, and removes the vectors it wrote of a version that had no
manifest yet, so a full Redis is not left fuller. Writing the same
version twice writes the same bytes (idempotent); a different model under a version that is
already loaded is refused, since versions are immutable.

``name`` (`rerank load DIR --as NAME`) loads the same files under another version name: the
folder is verified against its own manifest as always, and only the copy in Redis says
``version: NAME`` with ``artifact`` naming the folder, where every process finds the files
(A/A tests, staged copies). Each load is recorded in ``rr:versions`` (its time, its folder)
for `rerank versions`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import redis

from app.config import cluster_url
from app.errors import LoadFailed, ManifestMismatch, VersionRefused
from app.store import ARTIFACT, Keys
from app.versions import activate as activate_version
from app.versions import activation_problem, now_iso
from contract import (
    VECTORS_FILE,
    Manifest,
    ManifestError,
    check_same,
    read_item_ids,
    verify_folder,
)

log = logging.getLogger(__name__)

CHUNK = 1000  # keys per pipelined MSET / EXISTS: big enough to amortise, small for Redis


Client = redis.Redis | redis.RedisCluster


def connect(redis_url: str, cluster: bool = False) -> Client:
    """A plain client, or a cluster client for ``redis+cluster://`` URLs or ``cluster``."""
    plain, is_cluster = cluster_url(redis_url)
    if is_cluster or cluster:
        return redis.RedisCluster.from_url(plain, socket_timeout=30)
    return redis.Redis.from_url(redis_url, socket_timeout=30)


def load_into_redis(
    redis_url: str,
    model_path: Path,
    prefix: str = "rr",
    activate: bool = True,
    cluster: bool = False,
    name: str | None = None,
) -> Manifest:
    """Load ``model_path`` (a verified model folder) into Redis under its version, or under
    ``name``; returns the manifest as Redis holds it.

    On a cluster the same order holds: the vectors go out pipelined per node, and the
    manifest and the pointer (single keys) are written only after every vector is verified.
    """
    manifest = renamed(verify_folder(model_path), name)
    keys = Keys(prefix)
    client = connect(redis_url, cluster)
    ids = read_item_ids(model_path)
    vectors = np.load(model_path / VECTORS_FILE)  # (n_items, D)
    try:
        # A different model under a loaded version is refused as it is (ManifestError).
        fresh = not _refuse_other_model(client, keys, manifest)
        # So is an activation that would make a fourth live version, before any write.
        problem = activation_problem(client, keys, manifest.version) if activate else None
        if problem:
            raise VersionRefused(problem)
    except BaseException:
        client.close()
        raise
    try:
        try:
            _write_vectors(client, keys, manifest, ids, vectors)
            _verify(client, keys, manifest, ids)
            # The registry entry before the manifest: a version whose manifest is in Redis
            # is always listed by `rerank versions`.
            record = {"loaded_at": now_iso(), ARTIFACT: model_path.name}
            client.hset(keys.versions, manifest.version, json.dumps(record))
            client.set(keys.manifest(manifest.version), manifest.to_json())
        except (redis.RedisError, ManifestError) as exc:
            if fresh:
                _remove_partial(client, keys, manifest, ids)
            raise LoadFailed(
                f"loading {manifest.version} into Redis failed, {keys.active} unchanged "
                f"({_active(client, keys)}): {exc}"
            ) from exc
        try:
            if activate:  # loaded and verified: a refusal now (the split changed) keeps it
                activate_version(client, keys, manifest.version)
        except (redis.RedisError, VersionRefused) as exc:
            raise LoadFailed(
                f"{manifest.version} is loaded but not active, {keys.active} "
                f"{_active(client, keys)}: {exc}"
            ) from exc
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


def renamed(manifest: Manifest, name: str | None) -> Manifest:
    """The manifest as Redis holds it under ``name`` (itself when no other name is given)."""
    if name is None or name == manifest.version:
        return manifest
    if not name or name.startswith(".") or "/" in name or any(c.isspace() for c in name):
        raise VersionRefused(f"--as {name!r}: a version name has no '/', space or leading dot")
    extra = {**manifest.extra, ARTIFACT: manifest.version}
    return dataclasses.replace(manifest, version=name, extra=extra)


def activate(redis_url: str, version: str, prefix: str = "rr", cluster: bool = False) -> None:
    """Point ``rr:active`` at an already loaded version (app/versions.py has the rules)."""
    client = connect(redis_url, cluster)
    try:
        activate_version(client, Keys(prefix), version)
    finally:
        client.close()


def _refuse_other_model(client: Client, keys: Keys, manifest: Manifest) -> bool:
    """True when this version is already loaded (same model); refuses a different one."""
    raw = client.get(keys.manifest(manifest.version))
    if raw is not None:
        check_same(manifest, Manifest.from_json(raw, "redis manifest"), "Redis")
    return raw is not None


def _active(client: Client, keys: Keys) -> str:
    try:
        value = client.get(keys.active)
    except redis.RedisError:
        return "unknown: Redis does not answer"
    if value is None:
        return "still unset"
    return f"still {value.decode() if isinstance(value, bytes) else value}"


def _remove_partial(client: Client, keys: Keys, m: Manifest, ids: list[str]) -> None:
    """Delete what a failed load wrote of a version nobody can use yet (no manifest)."""
    try:
        client.hdel(keys.versions, m.version)
        for start in range(0, len(ids), CHUNK):
            chunk = [keys.vector(m.version, i) for i in ids[start : start + CHUNK]]
            if isinstance(client, redis.RedisCluster):  # one UNLINK per key, pipelined per node
                pipe = client.pipeline()
                for key in chunk:
                    pipe.unlink(key)
                pipe.execute()
            else:
                client.unlink(*chunk)
    except redis.RedisError as exc:  # best effort: the load has failed already
        log.warning("could not remove the partial vectors of %s: %s", m.version, exc)


def _write_vectors(
    client: Client, keys: Keys, m: Manifest, ids: list[str], vectors: np.ndarray
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
        if isinstance(client, redis.RedisCluster):
            client.mset_nonatomic(mapping)  # one MSET per slot, pipelined per node
        else:
            client.mset(mapping)


def _verify(client: Client, keys: Keys, m: Manifest, ids: list[str]) -> None:
    """Every vector is there with the manifest's size (STRLEN is 0 for a missing key)."""
    found = wrong = 0
    for start in range(0, len(ids), CHUNK):
        pipe = client.pipeline(transaction=False)
        for item_id in ids[start : start + CHUNK]:
            pipe.strlen(keys.vector(m.version, item_id))
        for size in pipe.execute():
            found += int(size) > 0
            wrong += 0 < int(size) != m.vector_bytes
    if found != m.n_items:
        raise ManifestMismatch(f"{m.version}: {found} of {m.n_items} vectors in Redis")
    if wrong:
        raise ManifestMismatch(
            f"{m.version}: {wrong} vectors in Redis are not {m.vector_bytes} bytes"
        )
