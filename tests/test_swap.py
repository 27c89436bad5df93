"""Model versions: swap under traffic, a broken new version, a broken start."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from contract import ManifestError
from tests.conftest import N_ITEMS, VERSION_A, VERSION_B, broken_copy, serve
from tests.reference import Reference, assert_same_ranking


def test_swap_under_concurrent_traffic(
    loaded: str,
    settings_factory: Callable[..., Settings],
    redis_server: EmbeddedRedis,
    prefix: str,
    model_dir: Path,
    references: dict[str, Reference],
) -> None:
    app = create_app(settings_factory(version_poll_s=0.05))
    results: list[tuple[int, dict[str, Any], list[str], list[str]]] = []

    async def worker(seed: int, stop: asyncio.Event, client: Any) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            history = [str(rng.randint(1, N_ITEMS)) for _ in range(rng.randint(0, 10))]
            cands = [str(rng.randint(1, N_ITEMS)) for _ in range(rng.randint(1, 40))]
            body = {"user_id": "s", "candidates": cands, "k": 10, "history": history}
            response = await client.post("/rerank", json=body)
            results.append((response.status_code, response.json(), history, cands))

    async def main() -> None:
        async with serve(app) as client:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(worker(i, stop, client)) for i in range(4)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(
                load_into_redis, redis_server.url, model_dir / VERSION_B, prefix
            )
            for _ in range(200):  # the watcher polls every 50 ms; the load takes a moment
                if results and results[-1][1].get("model_version") == VERSION_B:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(main())
    versions = [body["model_version"] for _, body, _, _ in results]
    print(f"{len(results)} requests, {versions.count(VERSION_B)} on the new version")
    assert VERSION_A in versions and VERSION_B in versions
    # Once B answered, A never comes back.
    assert VERSION_A not in versions[versions.index(VERSION_B) + 50 :]
    for status, body, history, cands in results:
        assert status == 200 and not body["degraded"]
        scores, _, _, missing = references[body["model_version"]].score(history, cands)
        assert_same_ranking(body["items"], scores, missing, 10)


def test_a_broken_new_version_keeps_the_old_one(
    loaded: str,
    settings_factory: Callable[..., Settings],
    redis_server: EmbeddedRedis,
    prefix: str,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    local = broken_copy(model_dir, tmp_path, VERSION_B)
    app = create_app(settings_factory(model_dir=local, version_poll_s=0.05))
    with TestClient(app) as client:
        load_into_redis(redis_server.url, model_dir / VERSION_B, prefix)  # Redis has a good B
        for _ in range(100):
            if "rerank_model_swap_failures_total 1.0" in client.get("/metrics").text:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the broken version was not reported")
        body = client.post("/rerank", json={"user_id": "u", "candidates": ["1", "2"]}).json()
        assert body["model_version"] == VERSION_A and not body["degraded"]
        assert client.get("/readyz").json()["model_version"] == VERSION_A


def test_start_refuses_a_mismatching_model(
    loaded: str,
    settings_factory: Callable[..., Settings],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    local = broken_copy(model_dir, tmp_path, VERSION_A)
    app = create_app(settings_factory(model_dir=local))
    with pytest.raises(ManifestError, match="sha256"), TestClient(app):
        pass
