"""Batcher: gathering, errors, model pinning, a free event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from app.batcher import Batcher
from app.errors import ModelError
from app.metrics import Metrics
from app.model import Job, Scored


class FakeModel:
    """Scores a candidate by its first coordinate; records the batches it ran."""

    def __init__(self, version: str = "fake", gate: threading.Event | None = None) -> None:
        self.version = version
        self.gate = gate
        self.batches: list[int] = []
        self.fail = False

    def run_batch(self, jobs: list[Job]) -> list[Scored]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(len(jobs))
        if self.fail:
            raise ModelError("simulated")
        return [Scored(j.cand[:, 0].copy(), np.zeros((len(j.cand), len(j.hist)))) for j in jobs]


def job(value: float) -> Job:
    return Job(np.zeros((2, 4), np.float32), np.full((3, 4), value, np.float32), np.arange(3.0))


def run(body: Callable[[Batcher], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        options = {"max_batch": 4} | kwargs
        batcher = Batcher(metrics=Metrics(), **options)
        batcher.start()
        try:
            await body(batcher)
        finally:
            await batcher.close()

    asyncio.run(main())


def test_concurrent_requests_share_one_run() -> None:
    model = FakeModel()

    async def body(b: Batcher) -> None:
        start = time.perf_counter()
        results = await asyncio.gather(*(b.submit(model, job(i)) for i in range(4)))  # type: ignore[arg-type]
        assert time.perf_counter() - start < 0.15  # a full batch waits for nothing
        assert [r.scores[0] for r in results] == [0, 1, 2, 3]  # each gets its own rows

    run(body)
    assert model.batches == [4]


def test_a_failed_run_fails_its_requests_only() -> None:
    model = FakeModel()

    async def body(b: Batcher) -> None:
        model.fail = True
        with pytest.raises(ModelError):
            await b.submit(model, job(0))  # type: ignore[arg-type]
        model.fail = False
        assert (await b.submit(model, job(1))).scores[0] == 1  # type: ignore[arg-type]

    run(body)


def test_a_batch_spanning_a_swap_is_split_by_model() -> None:
    gate = threading.Event()
    blocker, old, new = FakeModel(gate=gate), FakeModel("old"), FakeModel("new")

    async def body(b: Batcher) -> None:
        first = asyncio.create_task(b.submit(blocker, job(0)))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        pending = [
            asyncio.create_task(b.submit(m, job(i)))  # type: ignore[arg-type]
            for i, m in enumerate([old, new, old, new])
        ]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, *pending)

    run(body, max_batch=8)
    assert old.batches == [2] and new.batches == [2]


def test_the_event_loop_runs_while_the_model_does() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def body(b: Batcher) -> None:
        request = asyncio.create_task(b.submit(model, job(0)))  # type: ignore[arg-type]
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 5 and not request.done()
        gate.set()
        await request

    run(body)


def test_an_idle_batcher_runs_a_lone_request_at_once() -> None:
    model = FakeModel()

    async def body(b: Batcher) -> None:
        start = time.perf_counter()
        await b.submit(model, job(1))  # type: ignore[arg-type]
        # Natural batching: nothing is running, so nothing is worth waiting for.
        assert time.perf_counter() - start < 0.25

    run(body, max_batch=8)
    assert model.batches == [1]


def test_requests_arriving_during_a_run_form_the_next_batch() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def body(b: Batcher) -> None:
        first = asyncio.create_task(b.submit(model, job(0)))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # running alone, blocked in the model
        later = [asyncio.create_task(b.submit(model, job(i))) for i in range(1, 7)]  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(first, *later)
        assert [r.scores[0] for r in results] == list(range(7))

    run(body, max_batch=4)
    assert model.batches == [1, 4, 2]  # capped at max_batch, the rest right after


class ThreadRecorder(FakeModel):
    """Records the thread each batch ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def run_batch(self, jobs: list[Job]) -> list[Scored]:
        self.threads.append(threading.current_thread().name)
        return super().run_batch(jobs)


def test_a_short_batch_alone_runs_on_the_loop_and_others_on_the_worker_thread() -> None:
    model = ThreadRecorder()
    alone = [True]

    async def body(b: Batcher) -> None:
        loop_thread = threading.current_thread().name
        for _ in range(2):
            await b.submit(model, job(1))  # type: ignore[arg-type]
        alone[0] = False
        await b.submit(model, job(2))  # type: ignore[arg-type]
        # The first run has no time per row to go by: the thread; the second is alone and
        # short; the third is not alone.
        assert model.threads[0].startswith("onnx")
        assert model.threads[1] == loop_thread
        assert model.threads[2].startswith("onnx")

    run(body, alone=lambda: alone[0], inline_max_s=1.0)


def test_a_batch_expected_to_take_longer_than_the_bound_runs_on_the_worker_thread() -> None:
    """A slow model (or a large request) would hold the loop: it goes to the thread."""
    model = ThreadRecorder()

    def slow_run(jobs: list[Job]) -> list[Scored]:
        time.sleep(0.02)
        return ThreadRecorder.run_batch(model, jobs)

    model.run_batch = slow_run  # type: ignore[method-assign]

    async def body(b: Batcher) -> None:
        for _ in range(3):
            await b.submit(model, job(1))  # type: ignore[arg-type]
        assert all(t.startswith("onnx") for t in model.threads)  # 20 ms for 3 rows > 5 ms

    run(body, alone=lambda: True, inline_max_s=0.005)


def test_without_alone_every_batch_runs_on_the_worker_thread() -> None:
    model = ThreadRecorder()

    async def body(b: Batcher) -> None:
        for _ in range(3):
            await b.submit(model, job(1))  # type: ignore[arg-type]
        assert all(t.startswith("onnx") for t in model.threads)

    run(body, inline_max_s=1.0)


def test_a_failed_run_on_the_loop_fails_its_requests_only() -> None:
    model = ThreadRecorder()

    async def body(b: Batcher) -> None:
        await b.submit(model, job(0))  # type: ignore[arg-type]
        model.fail = True
        with pytest.raises(ModelError):
            await b.submit(model, job(0))  # type: ignore[arg-type]
        model.fail = False
        assert (await b.submit(model, job(1))).scores[0] == 1  # type: ignore[arg-type]
        assert model.threads[1] == threading.current_thread().name  # the failed one: inline

    run(body, alone=lambda: True, inline_max_s=1.0)


def test_shutdown_fails_the_queued_requests_as_a_model_error() -> None:
    """The service answers them in the caller's order (degraded), not with a 5xx."""
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def main() -> None:
        batcher = Batcher(max_batch=1, metrics=Metrics())
        batcher.start()
        running = asyncio.create_task(batcher.submit(model, job(0)))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # taken by the loop, now blocked in the model
        queued = asyncio.create_task(batcher.submit(model, job(1)))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        threading.Timer(0.1, gate.set).start()  # the model's thread ends soon after
        await batcher.close()
        with pytest.raises(ModelError, match="shutting down"):
            await queued
        running.cancel()

    asyncio.run(main())
