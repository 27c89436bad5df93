"""`rerank versions`, `activate`, `drop` and `split`: the versions in Redis and who serves them.

A version is loaded once its manifest is in Redis: `rerank load` writes it only after every
vector is written and verified (app/loader.py), so "loaded" means "loaded and verified". The
live versions are the active one (``rr:active``) and the split's (``rr:split``,
app/split.py); at most ``MAX_LIVE``, since every process holds all of them.

Each command reads what it checks, then writes, and a refused one (``VersionRefused``, exit 2)
writes nothing. On a single Redis the check and the write are one transaction (WATCH on the
keys read, then MULTI/EXEC, retried if one of them changed meanwhile), so two operators
cannot together make a fourth live version or drop a version a split has just named. On
Redis Cluster those keys sit in different hash slots, where no transaction spans them: the
check and the write are two steps there.

`drop` deletes a version's keys without blocking Redis: SCAN over its vector keys and UNLINK
(freed in Redis's background thread) in batches of ``DROP_BATCH``, after a grace period in
which the processes stop using it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from app.errors import VersionRefused
from app.feedback import ArmStats
from app.split import MAX_LIVE, Split
from app.store import Keys

log = logging.getLogger(__name__)

DROP_BATCH = 1000  # keys per SCAN step and per UNLINK
Client = redis.Redis | redis.RedisCluster
Write = Callable[[Any], None]


@dataclass(frozen=True)
class VersionInfo:
    """One version as `rerank versions` shows it."""

    version: str
    loaded: bool  # its manifest is in Redis
    active: bool
    share: int  # percent of users in the split; 0 without one
    loaded_at: str | None
    artifact: str | None  # the model folder, when loaded under another name
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.active or self.share > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "loaded": self.loaded,
            "active": self.active,
            "share": self.share,
            "loaded_at": self.loaded_at,
            "artifact": self.artifact,
            "created_at": self.manifest.get("created_at"),
            "offline_metrics": self.manifest.get("offline_metrics"),
        }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def read_split(reader: Any, keys: Keys) -> Split | None:
    raw = reader.get(keys.split)
    return Split.from_json(raw) if raw is not None else None


def _loaded(reader: Any, keys: Keys, version: str) -> bool:
    return bool(reader.exists(keys.manifest(version)))


def _atomically(client: Client, watch: Sequence[str], check: Callable[[Any], Write]) -> None:
    """``check(reader)`` reads and validates (raising ``VersionRefused``), then returns the
    write, which runs in a transaction watching ``watch`` on a single Redis."""
    if isinstance(client, redis.RedisCluster):
        write = check(client)
        pipe = client.pipeline()
        write(pipe)
        pipe.execute()
        return

    def transaction(pipe: Any) -> None:
        write = check(pipe)  # immediate mode: after WATCH, reads answer at once
        pipe.multi()
        write(pipe)

    client.transaction(transaction, *watch)


def _too_many(active: str | None, split: Split | None) -> str | None:
    live = [] if active is None else [active]
    if split is not None:
        live += [v for v in split.versions if v not in live]
    if len(live) <= MAX_LIVE:
        return None
    return f"{len(live)} live versions ({', '.join(live)}): at most {MAX_LIVE}"


def activation_problem(reader: Any, keys: Keys, version: str) -> str | None:
    """Why ``version`` may not become active beside the split (None: it may)."""
    problem = _too_many(version, read_split(reader, keys))
    return f"activating {version} would make {problem}; change the split" if problem else None


def activate(client: Client, keys: Keys, version: str) -> None:
    """Point ``rr:active`` at a loaded version (rollback: activate the previous one)."""

    def check(reader: Any) -> Write:
        if not _loaded(reader, keys, version):
            raise VersionRefused(f"version {version} is not loaded")
        problem = activation_problem(reader, keys, version)
        if problem:
            raise VersionRefused(problem)
        return lambda pipe: pipe.set(keys.active, version)

    _atomically(client, [keys.active, keys.split, keys.manifest(version)], check)


def set_split(client: Client, keys: Keys, split: Split) -> None:
    """Set ``rr:split``: every version loaded, at most ``MAX_LIVE`` live with the active."""

    def check(reader: Any) -> Write:
        for version in split.versions:
            if not _loaded(reader, keys, version):
                raise VersionRefused(f"version {version} is not loaded")
        active = _text(reader.get(keys.active))
        problem = _too_many(active, split)
        if problem:
            raise VersionRefused(f"split: {problem}")
        return lambda pipe: pipe.set(keys.split, split.to_json())

    watch = [keys.active, keys.split, *(keys.manifest(v) for v in split.versions)]
    _atomically(client, watch, check)


def clear_split(client: Client, keys: Keys) -> bool:
    """Remove ``rr:split``: every process serves ``rr:active`` alone. False: none was set."""
    return bool(client.delete(keys.split))


def list_versions(client: Client, keys: Keys) -> list[VersionInfo]:
    """Every version in the registry (``rr:versions``), plus the live ones, oldest load first."""
    registry = {_text(k) or "": json.loads(v) for k, v in client.hgetall(keys.versions).items()}
    active = _text(client.get(keys.active))
    split = read_split(client, keys)
    names = list(registry)
    for name in [active, *(split.versions if split else ())]:
        if name is not None and name not in names:
            names.append(name)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(keys.manifest(name))
    manifests = pipe.execute()
    out = []
    for name, raw in zip(names, manifests, strict=True):
        meta = registry.get(name, {})
        out.append(
            VersionInfo(
                name,
                raw is not None,
                name == active,
                split.share(name) if split else 0,
                meta.get("loaded_at"),
                meta.get("artifact") if meta.get("artifact") != name else None,
                json.loads(raw) if raw is not None else {},
            )
        )
    out.sort(key=lambda v: (v.loaded_at or "", v.version))
    return out


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def drop(
    client: Client, keys: Keys, version: str, grace_s: float = 0.0, batch: int = DROP_BATCH
) -> int:
    """Delete a version that is not live: its manifest and registry entry first (no process
    can load it any more), then, after ``grace_s``, its vectors. Returns the keys deleted."""

    def check(reader: Any) -> Write:
        if _text(reader.get(keys.active)) == version:
            raise VersionRefused(f"version {version} is live (active): activate another first")
        split = read_split(reader, keys)
        if split is not None and version in split.versions:
            raise VersionRefused(
                f"version {version} is live (in the split {split.to_json()}): "
                "change or clear the split first"
            )

        def write(pipe: Any) -> None:
            pipe.delete(keys.manifest(version))
            pipe.hdel(keys.versions, version)
            pipe.delete(keys.ab(version))

        return write

    known = _loaded(client, keys, version) or bool(client.hexists(keys.versions, version))
    _atomically(client, [keys.active, keys.split, keys.manifest(version)], check)
    if grace_s > 0:
        time.sleep(grace_s)
    deleted = _unlink_matching(client, _glob_escape(keys.vector_prefix(version)) + "*", batch)
    if not known and not deleted:
        raise VersionRefused(f"version {version} is not loaded: nothing to drop")
    log.info("dropped %s: %d vector keys deleted", version, deleted)
    return deleted


def _unlink_matching(client: Client, pattern: str, batch: int) -> int:
    """SCAN for ``pattern`` and UNLINK in batches: each command is short, so Redis keeps
    answering everyone else meanwhile, and UNLINK frees memory in its background thread."""
    deleted = 0
    chunk: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=batch):
        chunk.append(key)
        if len(chunk) >= batch:
            deleted += _unlink(client, chunk)
            chunk = []
    if chunk:
        deleted += _unlink(client, chunk)
    return deleted


def _unlink(client: Client, chunk: list[bytes]) -> int:
    if isinstance(client, redis.RedisCluster):  # one UNLINK per key, pipelined per node
        pipe = client.pipeline()
        for key in chunk:
            pipe.unlink(key)
        return sum(int(n) for n in pipe.execute())
    return int(client.unlink(*chunk))


def arm_stats(client: Client, keys: Keys, versions: Sequence[str] | None = None) -> list[ArmStats]:
    """The online counts of ``versions``; by default the split's versions (the active one
    first, as the control), else every version that has counts."""
    only_counted = False
    if not versions:
        split = read_split(client, keys)
        if split is not None:
            active = _text(client.get(keys.active))
            versions = sorted(split.versions, key=lambda v: v != active)
        else:
            versions = [v.version for v in list_versions(client, keys)]
            only_counted = True
    pipe = client.pipeline(transaction=False)
    for version in versions:
        pipe.hgetall(keys.ab(version))
    return [
        ArmStats.from_hash(version, data)
        for version, data in zip(versions, pipe.execute(), strict=True)
        if data or not only_counted
    ]
