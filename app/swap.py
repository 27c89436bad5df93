"""Follow ``rr:active`` and ``rr:split``: load, check and warm every live version, then
swap them in at once.

The live versions are the active one and the split's (app/split.py), at most three. New ones
load in a thread while the current ones keep serving; once every live version is loaded and
warmed, the new ``Routing`` replaces the old in one reference assignment, read once per
request (the request's pinned model). So a split takes effect in a process only when all of
its models are ready there, and a request never waits for a load. A routing that fails to
load (a version that does not verify, a split that does not parse) is logged and counted, the
current routing keeps serving, and the same target is tried again only every
``RETRY_FAILED_S`` (its files may still be on their way to this machine).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.background import stop_loop
from app.errors import ManifestMismatch, ModelError, StoreUnavailable, VersionRefused
from app.metrics import Metrics
from app.model import LoadedModel, open_model
from app.split import MAX_LIVE, TOTAL, Split, user_point
from app.store import ARTIFACT, Store
from contract import Manifest, ManifestError, check_same, read_item_ids, verify_folder

log = logging.getLogger(__name__)

RETRY_FAILED_S = 30.0


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model; the same for every version."""

    model_dir: Path
    providers: Sequence[str]
    threads: int
    max_candidates: int
    max_batch: int


@dataclass(frozen=True)
class Serving:
    """A loaded model and a few of its item ids, to check that its vectors are in Redis."""

    model: LoadedModel
    sample_ids: tuple[str, ...]


@dataclass(frozen=True)
class Routing:
    """Which loaded model answers which user: the active one, or the split's arms."""

    active: Serving | None = None
    split: Split | None = None
    arms: tuple[tuple[int, Serving], ...] = ()  # (upper bound of the arm's points, model)

    @property
    def active_version(self) -> str | None:
        return self.active.model.version if self.active is not None else None

    def live(self) -> dict[str, Serving]:
        """Every version this routing holds, the active one first."""
        out = {} if self.active is None else {self.active.model.version: self.active}
        for _, serving in self.arms:
            out.setdefault(serving.model.version, serving)
        return out

    def shares(self) -> dict[str, int]:
        if self.split is not None:
            return dict(self.split.shares)
        return {} if self.active is None else {self.active.model.version: TOTAL}

    def pick(self, user_id: str) -> LoadedModel | None:
        """The user's model: their arm of the split, else the active one."""
        if self.arms:
            point = user_point(user_id)
            for upper, serving in self.arms:
                if point < upper:
                    return serving.model
        return self.active.model if self.active is not None else None


class ModelHolder:
    """The serving routing; replaced whole, so a reader sees the old or the new, never a mix."""

    def __init__(self) -> None:
        self.routing = Routing()

    @property
    def serving(self) -> Serving | None:
        """The active version's model."""
        return self.routing.active

    @property
    def model(self) -> LoadedModel | None:
        serving = self.routing.active
        return serving.model if serving is not None else None

    def pick(self, user_id: str) -> LoadedModel | None:
        return self.routing.pick(user_id)


def load_version(spec: ModelSpec, remote: Manifest) -> Serving:
    """Verify the local folder of ``remote`` against both manifests; load and warm.

    A version loaded under another name (``rerank load DIR --as NAME``) names its folder in
    the Redis manifest's ``artifact``; the folder's files are checked against their hashes
    all the same, and the model serves under the name.
    """
    folder_name = remote.extra.get(ARTIFACT, remote.version)
    if (
        not isinstance(folder_name, str)
        or not folder_name
        or "/" in folder_name
        or folder_name.startswith(".")
    ):
        raise ManifestError(f"redis manifest of {remote.version}: {ARTIFACT} is not a folder name")
    folder = spec.model_dir / folder_name
    local = verify_folder(folder)
    named = dataclasses.replace(local, version=remote.version, extra=remote.extra)
    check_same(named, remote, "Redis")
    model = open_model(
        folder, named, spec.providers, spec.threads, spec.max_candidates, spec.max_batch
    )
    ids = read_item_ids(folder)
    return Serving(model, (ids[0], ids[len(ids) // 2], ids[-1]))


@dataclass(eq=False)
class VersionWatcher:
    """Polls ``rr:active`` and ``rr:split`` every ``poll_s`` and swaps in what they name."""

    store: Store
    holder: ModelHolder
    spec: ModelSpec
    poll_s: float
    metrics: Metrics
    failed_target: tuple[str | None, bytes | None] | None = field(default=None, init=False)
    _failed_at: float = field(default=0.0, init=False)
    # What serves now.
    _target: tuple[str | None, bytes | None] | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="version-watcher")

    async def close(self) -> None:
        await stop_loop(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except StoreUnavailable as exc:  # Redis is sick: the next poll tries again
                log.debug("version poll: %s", exc)

    async def poll_once(self, strict: bool = False) -> None:
        """Swap to what ``rr:active`` and ``rr:split`` name if it changed. ``strict`` raises
        load failures (start-up)."""
        active, split_raw = await self.store.routing()
        target = (active, split_raw)
        if target == self._target or target == (None, None):
            return
        loop = asyncio.get_running_loop()
        if target == self.failed_target and loop.time() - self._failed_at < RETRY_FAILED_S:
            return
        current = self.holder.routing
        try:
            split = Split.from_json(split_raw) if split_raw is not None else None
            wanted = live_versions(active, split)
            if len(wanted) > MAX_LIVE:
                raise VersionRefused(f"{len(wanted)} live versions {wanted}: at most {MAX_LIVE}")
            held = current.live()
            ready: dict[str, Serving] = {}
            for version in wanted:  # every live model ready before any of them serves
                ready[version] = held.get(version) or await self._load(version)
        except (ManifestError, ModelError, OSError, ValueError, VersionRefused) as exc:
            self.failed_target, self._failed_at = target, loop.time()
            self.metrics.swap_failures.inc()
            log.error(
                "routing %s not loaded, keeping %s: %s",
                _describe(active, split_raw),
                current_name(current),
                exc,
            )
            if strict:
                raise
            return
        arms = tuple((upper, ready[v]) for upper, v in split.bounds()) if split else ()
        routing = Routing(ready.get(active) if active is not None else None, split, arms)
        self.holder.routing = routing  # the swap: one reference assignment
        self._target, self.failed_target = target, None
        self._publish(current, routing)
        log.info("serving %s (was %s)", current_name(routing), current_name(current))

    async def _load(self, version: str) -> Serving:
        raw = await self.store.manifest_json(version)
        if raw is None:
            raise ManifestMismatch(f"version {version} is live but has no manifest")
        remote = Manifest.from_json(raw, f"redis manifest of {version}")
        serving = await asyncio.to_thread(load_version, self.spec, remote)
        self.metrics.swaps.inc()
        return serving

    def _publish(self, old: Routing, new: Routing) -> None:
        shares = new.shares()
        for version in old.shares().keys() - shares.keys():
            self.metrics.model_share.labels(version).set(0)
        for version, share in shares.items():
            self.metrics.model_share.labels(version).set(share)
        if new.active is not None:
            self.metrics.active_version.info({"version": new.active.model.version})
        self.metrics.model_loaded.set(1 if new.live() else 0)


def live_versions(active: str | None, split: Split | None) -> list[str]:
    """The active version, then the split's others: what a process must hold."""
    wanted = [] if active is None else [active]
    if split is not None:
        wanted += [v for v in split.versions if v != active]
    return wanted


def current_name(routing: Routing) -> str:
    """``v1`` for one active version, ``v1=50 v2=50 (active v1)`` for a split; ``none``."""
    if routing.split is None:
        return routing.active_version or "none"
    arms = " ".join(f"{v}={p}" for v, p in routing.split.shares)
    return f"{arms} (active {routing.active_version or 'none'})"


def _describe(active: str | None, split_raw: bytes | None) -> str:
    split = "" if split_raw is None else f", split {split_raw.decode('utf-8', 'replace')}"
    return f"active {active or 'none'}{split}"
