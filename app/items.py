"""Items that arrive after training: ``POST /items`` and ``rerank items add`` (docs/api.md).

An item's text and attributes become its vector through the serving model's own item encoder,
in ONNX: the text encoder shared by every version (``models/encoder/``, app/encoder.py), then
the version's item tower (``models/<version>/item_tower.onnx``, contract/items.py). The vector
is written under every live version that has an item tower, as ``rr:v:<version>:<item_id>``,
with SET NX: a vector that exists is never replaced, so the versions' vectors stay immutable
and the process caches stay right.

The encoder never runs on the event loop. One worker thread runs it, one call at a time, and
at most ``items_queue`` calls wait for it; past that a call gets the overload answer (503
with Retry-After), so a burst of new items cannot hold the process's admission slots long.
The worker thread runs under SCHED_IDLE (Linux): encoding an item takes the CPU of several
/rerank requests, and under SCHED_IDLE the thread gives up its core at once to any other
thread that wakes there. It still slows the /rerank requests that run beside it on the other
cores, which share the caches (docs/benchmark.md, New items beside /rerank).
The text encoder and the towers load on first use, or at start-up when the active model has
an item tower; a model without one loads nothing, and the process stays as small as before.
Nothing here imports PyTorch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import TYPE_CHECKING, Any

import numpy as np

from app.config import Settings
from app.errors import BadItems, ItemsBusy, ModelError, NoItemTower
from app.metrics import Metrics
from app.split import Split
from app.store import Store
from contract import (
    ATTRS,
    ENCODER_DIR,
    ITEM_VEC,
    TEXT_VEC,
    BadAttribute,
    ItemTowerSpec,
    Manifest,
    ManifestError,
    sha256_file,
)

if TYPE_CHECKING:
    import onnxruntime as ort

    from app.encoder import TextEncoder
    from app.swap import ModelHolder

log = logging.getLogger(__name__)

MAX_TOWERS = 4  # towers kept loaded: the live versions (at most 3) and one on its way out
WORKER_NICE = 19  # where SCHED_IDLE is refused: the lowest nice value


@dataclass(frozen=True)
class NewItem:
    item_id: str
    text: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Added:
    """What one call did: per item, added (written under at least one version) or existing
    (a vector under every version already); the versions written to; the attribute names
    that no version reads."""

    added: list[str]
    existing: list[str]
    versions: list[str]
    ignored_attributes: list[str]


async def live_versions(store: Store) -> list[str]:
    """The versions that serve answers now, and so need a new item's vector: the active one
    and the arms of a split (``rr:active`` and ``rr:split``, read in one round trip)."""
    active, raw_split = await store.routing()
    live = [] if active is None else [active]
    if raw_split is not None:
        live += [v for v, _ in Split.from_json(raw_split).shares if v not in live]
    return live


class Tower:
    """One version's item tower: its spec and ONNX Runtime session (blocking calls)."""

    def __init__(self, version: str, spec: ItemTowerSpec, session: ort.InferenceSession) -> None:
        self.version = version
        self.spec = spec
        self.session = session

    def run(self, text_vec: np.ndarray, attrs: np.ndarray) -> np.ndarray:
        """(B, text_dim) and (B, A) float32 -> (B, D) float32."""
        try:
            (out,) = self.session.run([ITEM_VEC], {TEXT_VEC: text_vec, ATTRS: attrs})
        except Exception as exc:  # ONNX Runtime's errors carry no useful type
            raise ModelError(f"{self.version}: the item tower failed: {exc}") from exc
        return np.asarray(out, dtype=np.float32)


def load_tower(model_dir: Path, manifest: Manifest, providers: Sequence[str]) -> Tower:
    """The tower of a version whose manifest has one, its file checked against the manifest."""
    from app.model import load_session

    spec = manifest.tower
    if spec is None:
        raise NoItemTower(f"model {manifest.version} has no item tower")
    path = model_dir / manifest.version / spec.file
    if not path.is_file():
        raise ManifestError(f"{path}: the item tower of {manifest.version} is missing")
    if sha256_file(path) != manifest.sha256[spec.file]:
        raise ManifestError(f"{path}: sha256 differs from the manifest of {manifest.version}")
    session = load_session(path, providers, 1)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    want = {TEXT_VEC: spec.text_dim, ATTRS: spec.width}
    for name, width in want.items():
        got = shapes.get(name)
        if got is None or (isinstance(got[-1], int) and got[-1] != width):
            raise ModelError(f"{path}: input {name} is {got}, the manifest says width {width}")
    return Tower(manifest.version, spec, session)


class ItemEncoder:
    """The text encoder and the versions' towers, loaded on first use; its methods block (the
    worker thread calls them)."""

    def __init__(self, model_dir: Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.model_dir = model_dir
        self.providers = list(providers)
        self._text: TextEncoder | None = None
        self._towers: dict[str, Tower] = {}
        self._lock = Lock()  # start-up's preload and the worker thread may meet

    def text_encoder(self) -> TextEncoder:
        with self._lock:
            if self._text is None:
                from app.encoder import encoder_dir, load_encoder

                self._text = load_encoder(encoder_dir(self.model_dir), 1, self.providers)
                log.info("text encoder of new items loaded from %s", self._text.folder)
            return self._text

    def tower(self, manifest: Manifest) -> Tower:
        with self._lock:
            tower = self._towers.get(manifest.version)
            if tower is None:
                tower = load_tower(self.model_dir, manifest, self.providers)
                while len(self._towers) >= MAX_TOWERS:  # the oldest loaded goes first
                    del self._towers[next(iter(self._towers))]
                self._towers[manifest.version] = tower
                log.info("item tower of %s loaded", manifest.version)
        text = self.text_encoder()
        sha = text.manifest["sha256"]["model.onnx"]
        if sha != tower.spec.text_encoder_sha256:
            raise ModelError(
                f"{self.model_dir / ENCODER_DIR} is not the text encoder that {manifest.version} "
                f"was trained with (sha256 {sha[:12]}..., the model's manifest says "
                f"{tower.spec.text_encoder_sha256[:12]}...): restore models/encoder/ from "
                "the repository and `make encoder`"
            )
        return tower

    def preload(self, manifest: Manifest) -> None:
        """Load the text encoder and this version's tower now (start-up)."""
        self.tower(manifest)

    def vectors(
        self, jobs: Sequence[tuple[Manifest, Sequence[str], np.ndarray]]
    ) -> list[np.ndarray]:
        """Per (manifest, texts, attrs (B, A)): the item vectors (B, D) float32. A text that
        several versions read alike is encoded once."""
        towers = [self.tower(m) for m, _, _ in jobs]
        distinct = list(dict.fromkeys(t for _, texts, _ in jobs for t in texts))
        encoded = self.text_encoder().encode(distinct) if distinct else np.zeros((0, 0))
        row = {t: i for i, t in enumerate(distinct)}
        out = []
        for tower, (_, texts, attrs) in zip(towers, jobs, strict=True):
            text_vec = encoded[[row[t] for t in texts]].astype(np.float32)
            out.append(tower.run(text_vec, attrs.astype(np.float32)))
        return out


def lower_priority() -> None:
    """The calling thread runs under SCHED_IDLE (Linux sets it per thread; lowering needs no
    privilege): the scheduler preempts it at once for any other thread that wakes on its
    core, where a thread at nice 19 only weighs less and a woken thread can wait behind it
    (docs/benchmark.md, New items beside /rerank). Where the kernel refuses SCHED_IDLE the
    thread takes nice 19; elsewhere it keeps its priority."""
    if not sys.platform.startswith("linux"):  # elsewhere the calls would set the process's
        return
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError) as exc:
        log.warning("the item encoder's thread cannot take SCHED_IDLE (%s): nice 19", exc)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, WORKER_NICE)
    except (AttributeError, OSError) as exc:
        log.warning("the item encoder's thread keeps its priority: %s", exc)


class EncoderQueue:
    """One worker thread for the item encoder, under SCHED_IDLE, and a bound on the calls
    waiting for it."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="items", initializer=lower_priority
        )
        self._pending = 0  # the call running and those waiting

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Any, *args: Any) -> Any:
        if self._pending > self.max_waiting:
            raise ItemsBusy("the item encoder's queue is full")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass(eq=False)
class ItemsService:
    """Validate, encode off the loop, write with SET NX under every live version."""

    store: Store
    encoder: ItemEncoder
    queue: EncoderQueue
    metrics: Metrics
    holder: ModelHolder | None = None
    # Versions are immutable: a manifest read once is never stale.
    _manifests: dict[str, Manifest] = field(default_factory=dict, init=False)

    async def manifest(self, version: str) -> Manifest:
        model = self.holder.model if self.holder is not None else None
        if model is not None and model.version == version:
            return model.manifest
        cached = self._manifests.get(version)
        if cached is None:
            raw = await self.store.manifest_json(version)
            if raw is None:
                raise NoItemTower(f"version {version} is live but has no manifest in Redis")
            cached = Manifest.from_json(raw, f"redis manifest of {version}")
            if len(self._manifests) >= MAX_TOWERS:
                self._manifests.clear()
            self._manifests[version] = cached
        return cached

    async def towered(self) -> list[Manifest]:
        """The live versions that have an item tower; NoItemTower when there are none."""
        versions = await live_versions(self.store)
        if not versions:
            raise NoItemTower("no model version is active: load one with `rerank load`")
        manifests = [await self.manifest(v) for v in versions]
        with_tower = [m for m in manifests if m.item_tower is not None]
        if not with_tower:
            raise NoItemTower(
                f"the serving model ({', '.join(versions)}) has no item tower, so it cannot "
                "add items: train one with `rerank train` (docs/model.md, Items that arrive "
                "after training) and load it"
            )
        return with_tower

    async def add(self, items: Sequence[NewItem]) -> Added:
        manifests = await self.towered()
        prepared = prepare_all(items, manifests)
        ids = [i.item_id for i in items]
        need: set[int] = set()
        missing: list[list[bool]] = []
        for m in manifests:
            exists = await self.store.vectors_exist(m.version, ids)
            missing.append([not e for e in exists])
            need.update(i for i, e in enumerate(exists) if not e)
        rows = sorted(need)
        written = [[False] * len(items) for _ in manifests]
        if rows:
            jobs = [
                (m, [p[r].text for r in rows], np.stack([p[r].attrs for r in rows]))
                for m, p in zip(manifests, prepared, strict=True)
            ]
            start = time.perf_counter()
            try:
                vectors = await self.queue.run(self.encoder.vectors, jobs)
            except ItemsBusy:
                self.metrics.shed.inc()
                raise
            self.metrics.item_encoder_seconds.observe(time.perf_counter() - start)
            for k, (m, v) in enumerate(zip(manifests, vectors, strict=True)):
                todo = [j for j, r in enumerate(rows) if missing[k][r]]
                if not todo:
                    continue
                data = np.ascontiguousarray(v[todo], dtype=m.wire_dtype)
                done = await self.store.add_vectors(
                    m.version, [ids[rows[j]] for j in todo], [row.tobytes() for row in data]
                )
                for j, ok in zip(todo, done, strict=True):
                    written[k][rows[j]] = ok
        added = [ids[i] for i in range(len(items)) if any(w[i] for w in written)]
        existing = [ids[i] for i in range(len(items)) if not any(w[i] for w in written)]
        read = set().union(*(m.tower.names for m in manifests if m.tower is not None))
        ignored = sorted({k for i in items for k in i.attributes if k not in read})
        self.metrics.items_added.inc(len(added))
        if ignored:
            self.metrics.item_attributes_ignored.inc(len(ignored))
        return Added(added, existing, [m.version for m in manifests], ignored)


def prepare_all(items: Sequence[NewItem], manifests: Sequence[Manifest]) -> list[list[Any]]:
    """Per manifest, per item, its encoder text and attribute row (contract/items.py);
    ``BadItems`` names every item that a version cannot read, and repeated ids."""
    errors: list[dict[str, Any]] = []
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.item_id in first:
            errors.append(
                _error(
                    i,
                    ("item_id",),
                    f"item {item.item_id!r} is also item {first[item.item_id]}"
                    "; send each item once",
                    item.item_id,
                )  # fmt: skip
            )
        first.setdefault(item.item_id, i)
    out: list[list[Any]] = []
    for m in manifests:
        spec = m.tower
        assert spec is not None
        rows: list[Any] = []
        for i, item in enumerate(items):
            try:
                rows.append(spec.prepare(item.text, item.attributes))
            except BadAttribute as exc:
                errors.append(
                    _error(
                        i,
                        ("attributes", exc.name),
                        f"item {item.item_id!r}: attribute {exc.name} {exc.message}",
                        item.attributes.get(exc.name),
                    )
                )
        out.append(rows)
    if errors:
        unique = list({(tuple(e["loc"]), e["msg"]): e for e in errors}.values())
        raise BadItems(unique)
    return out


def _error(index: int, where: tuple[str, ...], msg: str, value: Any) -> dict[str, Any]:
    return {
        "type": "value_error",
        "loc": ["body", "items", index, *where],
        "msg": msg,
        "input": value,
    }


async def add_in_batches(
    settings: Settings, items: Sequence[NewItem], batch: int, say: Any = log.info
) -> Added:
    """``rerank items add``: the items of a file, straight into Redis (no HTTP), through the
    same checks, encoder and SET NX as POST /items. Every item is checked before the first
    is written, so a bad file writes nothing."""
    from app.factory import make_store, redis_client
    from app.model import choose_providers

    metrics = Metrics()
    client = redis_client(settings.redis_url or "", settings)
    store = make_store(client, settings.model_copy(update={"redis_timeout_ms": 5000.0}), metrics)
    queue = EncoderQueue(max_waiting=1)
    encoder = ItemEncoder(settings.model_dir, choose_providers(settings.onnx_providers))
    service = ItemsService(store, encoder, queue, metrics)
    try:
        manifests = await service.towered()
        prepare_all(items, manifests)
        total = Added([], [], [m.version for m in manifests], [])
        for start in range(0, len(items), batch):
            done = await service.add(items[start : start + batch])
            total.added.extend(done.added)
            total.existing.extend(done.existing)
            total.ignored_attributes[:] = sorted({*total.ignored_attributes,
                                                  *done.ignored_attributes})  # fmt: skip
            say(f"{min(start + batch, len(items))}/{len(items)} items: {len(total.added)} added, "
                f"{len(total.existing)} existing")  # fmt: skip
        return total
    finally:
        queue.close()
        await client.aclose()
