"""Follow ``rr:active``: load, check and warm a new model version, then swap it in.

The new session loads in a thread while the old one keeps serving; the swap itself is one
reference assignment, read once per request (the request's pinned model). A version that
fails to load is logged and counted, the old model keeps serving, and the version is tried
again only every ``RETRY_FAILED_S`` (its files may still be on their way to this machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.errors import ManifestMismatch, ModelError, StoreUnavailable
from app.metrics import Metrics
from app.model import LoadedModel, open_model
from app.store import Store
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


class ModelHolder:
    """The serving model; replaced whole, so a reader sees the old or the new, never a mix."""

    def __init__(self) -> None:
        self.serving: Serving | None = None

    @property
    def model(self) -> LoadedModel | None:
        serving = self.serving
        return serving.model if serving is not None else None


def load_version(spec: ModelSpec, remote: Manifest) -> Serving:
    """Verify the local folder of ``remote.version`` against both manifests; load and warm."""
    folder = spec.model_dir / remote.version
    local = verify_folder(folder)
    check_same(local, remote, "Redis")
    model = open_model(
        folder, local, spec.providers, spec.threads, spec.max_candidates, spec.max_batch
    )
    ids = read_item_ids(folder)
    return Serving(model, (ids[0], ids[len(ids) // 2], ids[-1]))


class VersionWatcher:
    def __init__(
        self,
        store: Store,
        holder: ModelHolder,
        spec: ModelSpec,
        poll_s: float,
        metrics: Metrics,
    ) -> None:
        self.store = store
        self.holder = holder
        self.spec = spec
        self.poll_s = poll_s
        self.metrics = metrics
        self.failed_version: str | None = None
        self._failed_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="version-watcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except StoreUnavailable as exc:  # Redis is sick: the next poll tries again
                log.debug("version poll: %s", exc)

    async def poll_once(self, strict: bool = False) -> None:
        """Swap to the active version if it is new. ``strict`` raises load failures (start-up)."""
        version = await self.store.active_version()
        current = self.holder.model
        if version is None:
            return
        loop = asyncio.get_running_loop()
        if version == self.failed_version and loop.time() - self._failed_at < RETRY_FAILED_S:
            return
        if current is not None and version == current.version:
            return
        raw = await self.store.manifest_json(version)
        try:
            if raw is None:
                raise ManifestMismatch(f"version {version} is active but has no manifest")
            remote = Manifest.from_json(raw, f"redis manifest of {version}")
            serving = await asyncio.to_thread(load_version, self.spec, remote)
        except (ManifestError, ModelError, OSError, ValueError) as exc:
            self.failed_version, self._failed_at = version, loop.time()
            self.metrics.swap_failures.inc()
            log.error("model %s not loaded, keeping %s: %s", version, _name(current), exc)
            if strict:
                raise
            return
        self.holder.serving = serving  # the swap: one reference assignment
        self.failed_version = None
        self.metrics.swaps.inc()
        self.metrics.active_version.info({"version": version})
        self.metrics.model_loaded.set(1)
        log.info("serving model %s (was %s)", version, _name(current))


def _name(model: LoadedModel | None) -> str:
    return model.version if model is not None else "none"
