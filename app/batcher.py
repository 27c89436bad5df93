"""Micro-batcher: the one caller of the ONNX sessions.

Requests wait in a queue; a single loop takes up to ``max_batch`` of them and runs
them as one padded batch on a dedicated worker thread, so the event loop never waits on ONNX
Runtime (which releases the GIL). Batching is natural: a request that finds the model idle
runs at once, with whatever was submitted in the same turn of the event loop, and a request
that arrives while a batch runs waits for that run only, then goes with everything else that
queued up meanwhile (at most ``max_batch``). Nobody is held back for company, so batches grow
with load by themselves and an idle service adds no wait. The queue needs no bound of its
own: only requests holding an admission slot submit (app/admission.py), so it never holds
more than ``max_inflight``.

A short batch that is the process's only work (``alone`` says so: one request in flight,
nobody waiting) runs on the event loop's own thread instead: there is nothing for the loop to
do meanwhile, and the hand-off to the worker thread and back (a queue, a wake-up of each
thread) is a visible share of a lone request's CPU (docs/benchmark.md, Profile). Short means
its rows times the running mean of the model's time per row is within ``inline_max_s``, so a
run on the loop delays a request that arrives meanwhile by about that at most; a slow model or
a large request goes to the thread. Once anything else is in flight, batches go to the worker
thread, so the loop reads and answers the other requests while the model runs.

Each request carries the ``LoadedModel`` it was pinned to when it started: a batch that spans
a model swap is split by model, so a request is always scored by the version whose vectors it
read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.background import stop_loop
from app.errors import ModelError
from app.metrics import Metrics
from app.model import Job, LoadedModel, Scored

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from app.tracing import Tracing

log = logging.getLogger(__name__)

# Weight of the newest batch in the running mean of the model's time per candidate row.
ROW_WEIGHT = 1 / 16


@dataclass
class _Pending:
    model: LoadedModel
    job: Job
    future: asyncio.Future[Scored]
    queued_at: float = field(default_factory=time.perf_counter)
    trace: Context | None = None  # the request's trace context, when it is traced


class Batcher:
    def __init__(
        self,
        max_batch: int,
        metrics: Metrics,
        tracing: Tracing | None = None,
        alone: Callable[[], bool] | None = None,
        inline_max_s: float = 0.0,
    ) -> None:
        self.max_batch = max_batch
        self.metrics = metrics
        self.tracing = tracing
        self.alone = alone  # None: every batch goes to the worker thread
        self.inline_max_s = inline_max_s  # 0: every batch goes to the worker thread
        self.row_s: float | None = None  # running mean of seconds per row; None: no run yet
        self._queue: deque[_Pending] = deque()
        self._nonempty = asyncio.Event()
        # One thread: batches run one after another, and ONNX Runtime uses its own
        # intra-op threads inside a run.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def close(self) -> None:
        await stop_loop(self._task)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ModelError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, model: LoadedModel, job: Job) -> Scored:
        """Queue one request and wait for its rows."""
        future: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        pending = _Pending(model, job, future)
        if self.tracing is not None:
            pending.trace = self.tracing.current()
        self._queue.append(pending)
        self._nonempty.set()
        return await future

    async def _loop(self) -> None:
        # The wake-up runs after the callbacks already due in this turn of the event loop, so
        # requests submitted together (asyncio.gather) are all queued by then; what arrives
        # while a batch runs is the next batch.
        while True:
            await self._nonempty.wait()
            batch = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch:
            pending = self._queue.popleft()
            if not pending.future.done():  # the caller gave up (disconnect, cancel)
                batch.append(pending)
        if not self._queue:
            self._nonempty.clear()
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        now = time.perf_counter()
        for pending in batch:
            self.metrics.queue_wait.observe(now - pending.queued_at)
        # Split by model: only during a swap does a batch hold two versions.
        groups: dict[int, list[_Pending]] = {}
        for pending in batch:
            groups.setdefault(id(pending.model), []).append(pending)
        loop = asyncio.get_running_loop()
        for group in groups.values():
            model = group[0].model
            jobs = [p.job for p in group]
            self.metrics.batch_size.observe(len(jobs))
            rows = sum(len(j.cand) for j in jobs)
            start = time.perf_counter()
            try:
                if self._inline(rows):
                    results = model.run_batch(jobs)
                else:
                    results = await loop.run_in_executor(self._executor, model.run_batch, jobs)
            except asyncio.CancelledError:  # shutdown: nobody will answer these any more
                for p in group:
                    p.future.cancel()
                raise
            except Exception as exc:  # the loop must outlive any one bad batch
                error = exc if isinstance(exc, ModelError) else ModelError(repr(exc))
                if self.tracing is not None:
                    self._trace(group, now, start, error)
                log.error("batch of %d on %s failed: %s", len(jobs), model.version, error)
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(error)
                continue
            finally:
                took = time.perf_counter() - start
                self.metrics.model_seconds.observe(took)
                per_row = took / max(rows, 1)
                if self.row_s is None:
                    self.row_s = per_row
                else:
                    self.row_s += ROW_WEIGHT * (per_row - self.row_s)
            if self.tracing is not None:
                self._trace(group, now, start, None)
            for p, result in zip(group, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)

    def _inline(self, rows: int) -> bool:
        """Whether a batch of ``rows`` candidates runs on the event loop's thread: it is the
        only work, and the model has run before and is expected to take ``inline_max_s`` at
        most for it."""
        return (
            self.row_s is not None
            and rows * self.row_s <= self.inline_max_s
            and self.alone is not None
            and self.alone()
        )

    def _trace(
        self, group: list[_Pending], taken_at: float, start: float, error: Exception | None
    ) -> None:
        """The group's queue waits and model run, as spans of the requests that are traced."""
        assert self.tracing is not None
        attributes = {
            "rerank.batch_size": len(group),
            "rerank.model_version": group[0].model.version,
        }
        self.tracing.batch(group, taken_at, start, time.perf_counter(), attributes, error)
