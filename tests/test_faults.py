"""Fail open: Redis stopped or paused mid-test, a full queue, a model that cannot run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.errors import ModelError
from app.factory import create_app
from app.loader import load_into_redis
from app.model import Job, LoadedModel, Scored
from tests.conftest import VERSION_A, make_settings, serve
from tests.redis_servers import paused

# Generous: the deadline is 50 ms of Redis time; the bound only has to prove "no hang".
WITHIN_DEADLINE_S = 1.0
CANDS = ["9", "3", "7", "3", "1"]


def ask(client: TestClient) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    # No history in the request: every call reads the stored list, so it needs Redis.
    response = client.post("/rerank", json={"user_id": "f", "candidates": CANDS, "k": 3})
    took = time.perf_counter() - start
    assert response.status_code == 200, response.text
    return response.json(), took


def assert_degraded(body: dict[str, Any]) -> None:
    assert body["degraded"] is True
    assert [i["item_id"] for i in body["items"]] == ["9", "3", "7"]  # the caller's order


def wait_ready(client: TestClient, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "no recovery"
        time.sleep(0.05)


def fault_app(own_redis: EmbeddedRedis, prefix: str, model_dir: Path) -> TestClient:
    load_into_redis(own_redis.url, model_dir / VERSION_A, prefix)
    return TestClient(create_app(make_settings(own_redis.url, prefix, model_dir)))


def test_redis_paused_then_resumed(own_redis: EmbeddedRedis, prefix: str, model_dir: Path) -> None:
    with fault_app(own_redis, prefix, model_dir) as client:
        body, _ = ask(client)
        assert not body["degraded"]
        with paused(own_redis):
            for _ in range(3):
                body, took = ask(client)
                assert_degraded(body)
                assert took < WITHIN_DEADLINE_S
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False
            assert 'reason="store"' in client.get("/metrics").text
        wait_ready(client)
        body, _ = ask(client)
        assert not body["degraded"] and body["model_version"] == VERSION_A


def test_redis_stopped_then_restarted(
    own_redis: EmbeddedRedis, prefix: str, model_dir: Path
) -> None:
    with fault_app(own_redis, prefix, model_dir) as client:
        assert not ask(client)[0]["degraded"]
        own_redis.stop()
        body, took = ask(client)
        assert_degraded(body)
        assert took < WITHIN_DEADLINE_S
        assert client.get("/readyz").status_code == 503
        ev = client.post("/events", json={"user_id": "f", "item_ids": ["1"]})
        assert ev.status_code == 503  # a write cannot fail open
        own_redis.start()  # same port, same data: the snapshot taken at shutdown
        wait_ready(client)
        body, _ = ask(client)
        assert not body["degraded"]


def test_readiness_needs_the_vectors(
    own_redis: EmbeddedRedis, prefix: str, model_dir: Path
) -> None:
    with fault_app(own_redis, prefix, model_dir) as client:
        wait_ready(client)
        r = redis.Redis.from_url(own_redis.url)
        try:
            r.delete(f"{prefix}:v:{VERSION_A}:1")
        finally:
            r.close()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["vectors"] is False


def slow(model: LoadedModel, seconds: float) -> None:
    original = model.run_batch

    def run_batch(jobs: list[Job]) -> list[Scored]:
        time.sleep(seconds)
        return original(jobs)

    model.run_batch = run_batch  # type: ignore[method-assign]


def test_past_the_slots_a_request_waits_in_line_and_is_served(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    """One slot, a slow model, a target it can meet: the others wait for the slot instead
    of being refused."""
    settings = settings_factory(max_inflight=1, queue_timeout_ms=10_000, latency_target_ms=10_000)
    app = create_app(settings)

    async def main() -> list[Any]:
        async with serve(app) as client:
            slow(app.state.holder.model, 0.1)
            body = {"user_id": "q", "candidates": ["1", "2"], "history": []}
            return await asyncio.gather(*(client.post("/rerank", json=body) for _ in range(4)))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 4


def test_past_the_line_deadline_the_answer_is_503_and_health_stays_open(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory(max_inflight=1, queue_timeout_ms=50, retry_after_s=3)
    app = create_app(settings)

    async def main() -> tuple[list[Any], Any, str]:
        async with serve(app) as client:
            slow(app.state.holder.model, 0.5)
            body = {"user_id": "d", "candidates": ["1", "2"], "history": []}
            first = asyncio.create_task(client.post("/rerank", json=body))
            await asyncio.sleep(0.1)  # the first one is in, waiting on the slow model
            refused = await asyncio.gather(*(client.post("/rerank", json=body) for _ in range(3)))
            health = await client.get("/healthz")
            await first
            metrics = (await client.get("/metrics")).text
            return [first.result(), *refused], health, metrics

    responses, health, metrics = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 503, 503, 503]
    for r in responses[1:]:
        assert r.headers["retry-after"] == "3"
        assert r.json() == {"detail": "overloaded: retry later"}
    assert health.status_code == 200  # never counted against the limit
    assert "rerank_shed_total 3.0" in metrics
    # Refusals are in the request metric with their status, so a shed share divides right.
    assert 'rerank_request_seconds_count{route="/rerank",status="503"} 3.0' in metrics


def test_a_request_refused_on_arrival_gets_its_503_at_the_deadline(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    """The slot and the line are taken when a request arrives: it is refused without its
    body read, and the 503 comes at its deadline (queue_timeout_ms), not at once, so that a
    caller ignoring Retry-After cannot come straight back."""
    settings = settings_factory(
        max_inflight=1, max_waiting=1, queue_timeout_ms=300, latency_target_ms=10_000
    )
    app = create_app(settings)

    async def main() -> tuple[list[Any], float]:
        async with serve(app) as client:
            slow(app.state.holder.model, 0.8)
            body = {"user_id": "h", "candidates": ["1", "2"], "history": []}
            first = asyncio.create_task(client.post("/rerank", json=body))
            await asyncio.sleep(0.1)  # the first holds the slot
            waiting = asyncio.create_task(client.post("/rerank", json=body))
            await asyncio.sleep(0.05)  # the second holds the line
            start = time.perf_counter()
            refused = await client.post("/rerank", json=body)
            took = time.perf_counter() - start
            return [await first, await waiting, refused], took

    responses, took = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 503, 503]
    assert 0.25 <= took < 2.0  # at the 300 ms deadline; before this rule, at once


def test_model_failure_is_degraded(client: TestClient) -> None:
    model = client.app.state.holder.model  # type: ignore[attr-defined]

    def broken(jobs: list[Job]) -> list[Scored]:
        raise ModelError("simulated")

    model.run_batch = broken
    body = client.post("/rerank", json={"user_id": "m", "candidates": ["5", "4"], "k": 2}).json()
    assert body["degraded"] and [i["item_id"] for i in body["items"]] == ["5", "4"]
    assert 'reason="model"' in client.get("/metrics").text
