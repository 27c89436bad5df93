"""A split of users between live versions: A/A, rollback under load, faults, online hits."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app import cli
from app.config import Settings
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from app.split import Split, user_point
from app.store import Keys
from app.versions import activate, clear_split, set_split
from contract import default_version, read_item_ids
from tests.conftest import N_ITEMS, VERSION_A, VERSION_B, broken_copy, make_settings, serve

MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT = default_version(MODELS) if MODELS.is_dir() else None
USERS = 1200


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def counts(r: redis.Redis, prefix: str, version: str) -> dict[str, float]:
    raw = r.hgetall(f"{prefix}:ab:{version}")
    return {k.decode(): float(v) for k, v in raw.items()}


def test_user_point_is_a_fixed_function_of_the_id() -> None:
    # Fixed values: every process, every restart, every release agrees on a user's arm.
    assert (user_point("196"), user_point("u0"), user_point("")) == (70, 61, 88)
    split = Split((("a", 50), ("b", 30), ("c", 20)))
    assert split.bounds() == ((50, "a"), (80, "b"), (100, "c"))
    shares = Counter(split.arm(f"user-{i}") for i in range(20_000))
    assert abs(shares["a"] / 20_000 - 0.5) < 0.02 and abs(shares["c"] / 20_000 - 0.2) < 0.02


@pytest.mark.slow
@pytest.mark.skipif(DEFAULT is None, reason="no default model in models/")
def test_a_a_split_is_even_sticky_and_shows_no_difference(
    redis_server: EmbeddedRedis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The default model loaded twice under two names, 50/50, two app instances."""
    assert DEFAULT is not None
    folder = MODELS / DEFAULT
    load_into_redis(redis_server.url, folder, prefix, name="aa-1")
    load_into_redis(redis_server.url, folder, prefix, activate=False, name="aa-2")
    r = redis.Redis.from_url(redis_server.url)
    set_split(r, Keys(prefix), Split((("aa-1", 50), ("aa-2", 50))))
    items = read_item_ids(folder)[:30]
    settings = make_settings(redis_server.url, prefix, MODELS, max_candidates=32)
    first: dict[str, dict[str, Any]] = {}
    try:
        with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
            for i in range(USERS):
                user = f"u{i}"
                body = {"user_id": user, "candidates": items, "k": 10}
                a = one.post("/rerank", json=body).json()
                b = two.post("/rerank", json=body).json()
                assert not a["degraded"] and a["model_version"] == b["model_version"], user
                first[user] = a
            for i in range(0, USERS, 10):  # and again, later, on the first instance
                user = f"u{i}"
                again = one.post("/rerank", json={"user_id": user, "candidates": items}).json()
                assert again["model_version"] == first[user]["model_version"]
            shares = Counter(answer["model_version"] for answer in first.values())
            assert set(shares) == {"aa-1", "aa-2"}
            for version, n in shares.items():
                assert 0.45 <= n / USERS <= 0.55, (version, n)
            # Every answer is remembered before the events come (the writer is asynchronous).
            wait_for(
                lambda: (
                    sum(counts(r, prefix, v).get("impressions", 0) for v in shares)
                    == 2 * USERS + USERS // 10
                ),
                "every answer remembered",
            )
            # A third of the users take an item at position 1..5 of their answer; the others
            # take an item that was not shown (no hit).
            taken = 0
            for i in range(USERS):
                user = f"u{i}"
                shown = [item["item_id"] for item in first[user]["items"]]
                if i % 3 == 0:
                    event = [shown[(i // 3) % 5]]
                    taken += 1
                else:
                    event = [next(x for x in items if x not in shown)]
                assert two.post("/events", json={"user_id": user, "item_ids": event}).is_success
            wait_for(
                lambda: sum(counts(r, prefix, v).get("hits", 0) for v in shares) == taken,
                "every hit counted",
            )
            for version in shares:
                assert counts(r, prefix, version)["hits"] > 0.2 * shares[version] / 3
            metrics = one.get("/metrics").text + two.get("/metrics").text
            for version in shares:
                assert f'rerank_online_impressions_total{{version="{version}"}}' in metrics
                assert f'rerank_online_hits_total{{position="1",version="{version}"}}' in metrics
                assert f'rerank_model_share{{version="{version}"}} 50.0' in metrics
    finally:
        r.close()
    monkeypatch.setenv("RERANK_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RERANK_KEY_PREFIX", prefix)
    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)
    capsys.readouterr()
    assert cli.main(["split", "--report"]) == 0
    report = capsys.readouterr().out
    assert "aa-2 vs aa-1:" in report and "no significant difference" in report, report


def test_rollback_under_load_serves_only_the_old_version(
    redis_server: EmbeddedRedis,
    prefix: str,
    model_dir: Path,
    settings_factory: Callable[..., Settings],
) -> None:
    """NEW active and split 50/50 with OLD; `split --clear`, then `activate OLD`."""
    old, new = VERSION_A, VERSION_B
    load_into_redis(redis_server.url, model_dir / old, prefix, activate=False)
    load_into_redis(redis_server.url, model_dir / new, prefix)
    keys = Keys(prefix)
    r = redis.Redis.from_url(redis_server.url)
    set_split(r, keys, Split(((new, 50), (old, 50))))
    app = create_app(settings_factory(version_poll_s=0.05))
    results: list[tuple[int, dict[str, Any]]] = []

    async def worker(seed: int, stop: asyncio.Event, client: Any) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            cands = [str(rng.randint(1, N_ITEMS)) for _ in range(rng.randint(1, 30))]
            body = {"user_id": f"w{rng.randint(0, 999)}", "candidates": cands, "k": 5}
            response = await client.post("/rerank", json=body)
            results.append((response.status_code, response.json()))

    def served_by() -> set[str]:
        return {body.get("model_version") for _, body in results[-40:]}

    async def until(check: Callable[[], bool], what: str) -> None:
        for _ in range(600):
            if check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"never: {what}")

    async def main() -> None:
        async with serve(app) as client:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(worker(i, stop, client)) for i in range(4)]
            await until(lambda: served_by() == {new, old}, "both arms serve")
            await asyncio.to_thread(clear_split, r, keys)
            await until(lambda: served_by() == {new}, "the split cleared")
            await asyncio.to_thread(activate, r, keys, old)
            await until(lambda: served_by() == {old}, "the old version back")
            mark = len(results)
            await until(lambda: len(results) > mark + 100, "traffic after the rollback")
            stop.set()
            await asyncio.gather(*tasks)
            return None

    try:
        asyncio.run(main())
    finally:
        r.close()
    failed = [(status, body) for status, body in results if status != 200 or body["degraded"]]
    assert not failed, failed[:3]
    versions = [body["model_version"] for _, body in results]
    last_new = max(i for i, v in enumerate(versions) if v == new)
    assert set(versions[last_new + 1 :]) == {old} and len(versions) - last_new > 100


def test_a_split_waits_until_every_version_is_loaded(
    loaded: str,
    redis_server: EmbeddedRedis,
    prefix: str,
    model_dir: Path,
    settings_factory: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """B's folder is broken on this machine: the split does not take effect, A keeps serving."""
    local = broken_copy(model_dir, tmp_path, VERSION_B)
    load_into_redis(redis_server.url, model_dir / VERSION_B, prefix, activate=False)
    app = create_app(settings_factory(model_dir=local, version_poll_s=0.05))
    r = redis.Redis.from_url(redis_server.url)
    try:
        with TestClient(app) as client:
            set_split(r, Keys(prefix), Split(((VERSION_A, 50), (VERSION_B, 50))))
            wait_for(
                lambda: "rerank_model_swap_failures_total 1.0" in client.get("/metrics").text,
                "the failed split reported",
            )
            for i in range(40):
                body = client.post("/rerank", json={"user_id": f"x{i}", "candidates": ["1"]})
                assert body.json()["model_version"] == VERSION_A
            assert client.get("/readyz").json()["model_version"] == VERSION_A
    finally:
        r.close()


def test_redis_down_while_remembering_answers(
    own_redis: EmbeddedRedis, prefix: str, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Answers that need no Redis (history sent, vectors cached) still come; the lost writes
    are counted and logged as warnings, never as errors; the rest degrades as usual."""
    load_into_redis(own_redis.url, model_dir / VERSION_A, prefix)
    settings = make_settings(own_redis.url, prefix, model_dir)
    body = {"user_id": "f", "candidates": ["3", "1", "2"], "k": 3, "history": ["5", "6"]}
    with TestClient(create_app(settings)) as client:
        warm = client.post("/rerank", json=body).json()
        assert not warm["degraded"]
        own_redis.stop()
        with caplog.at_level("WARNING"):
            for _ in range(3):
                answer = client.post("/rerank", json=body)
                assert answer.status_code == 200
                assert answer.json()["items"] == warm["items"] and not answer.json()["degraded"]
            wait_for(
                lambda: (
                    'rerank_online_write_failures_total{op="remember"}'
                    in client.get("/metrics").text
                ),
                "the lost writes counted",
            )
            stored = client.post("/rerank", json={"user_id": "f", "candidates": ["3", "1"]})
            assert stored.status_code == 200 and stored.json()["degraded"] is True
            events = client.post("/events", json={"user_id": "f", "item_ids": ["1"]})
            assert events.status_code == 503
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
        assert any("online feedback" in r.getMessage() for r in caplog.records)


def test_a_hit_counts_once_at_its_best_position(
    loaded: str, redis_server: EmbeddedRedis, prefix: str, client: TestClient
) -> None:
    answer = client.post("/rerank", json={"user_id": "h", "candidates": ["1", "2", "3", "4"]})
    shown = [item["item_id"] for item in answer.json()["items"]]
    r = redis.Redis.from_url(redis_server.url)
    try:
        wait_for(lambda: r.exists(f"{prefix}:imp:h") == 1, "the answer remembered")
        assert 0 < r.ttl(f"{prefix}:imp:h") <= 3600
        assert r.hget(f"{prefix}:imp:h", shown[2]) == f"3 {VERSION_A}".encode()
        events = {"user_id": "h", "item_ids": ["nope", shown[3], shown[2]]}
        assert client.post("/events", json=events).is_success
        wait_for(lambda: counts(r, prefix, VERSION_A).get("hits") == 1, "the hit counted")
        assert client.post("/events", json={"user_id": "h", "item_ids": [shown[0]]}).is_success
        c = counts(r, prefix, VERSION_A)
        assert c["hits"] == 1 and c["hits:2-3"] == 1 and c["rr"] == pytest.approx(1 / 3)
        assert r.exists(f"{prefix}:imp:h") == 0  # consumed: one hit per answer
        metrics = client.get("/metrics").text
        assert f'rerank_online_hits_total{{position="2-3",version="{VERSION_A}"}} 1.0' in metrics
    finally:
        r.close()


def test_nothing_is_remembered_when_feedback_is_off(
    loaded: str, redis_server: EmbeddedRedis, prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    with TestClient(create_app(settings_factory(feedback_top_k=0))) as client:
        assert client.post("/rerank", json={"user_id": "o", "candidates": ["1", "2"]}).is_success
        assert client.post("/events", json={"user_id": "o", "item_ids": ["1"]}).is_success
    r = redis.Redis.from_url(redis_server.url)
    try:
        assert not list(r.scan_iter(f"{prefix}:imp:*")) and not list(r.scan_iter(f"{prefix}:ab:*"))
    finally:
        r.close()


def test_live_models_share_one_cpu_arena(
    loaded: str, redis_server: EmbeddedRedis, prefix: str, model_dir: Path, client: TestClient
) -> None:
    """Three live versions must not hold three arenas, each at its largest batch's peak."""
    load_into_redis(redis_server.url, model_dir / VERSION_B, prefix, activate=False)
    r = redis.Redis.from_url(redis_server.url)
    try:
        set_split(r, Keys(prefix), Split(((VERSION_A, 50), (VERSION_B, 50))))
    finally:
        r.close()
    holder = client.app.state.holder  # type: ignore[attr-defined]
    wait_for(lambda: len(holder.routing.live()) == 2, "both versions loaded")
    for serving in holder.routing.live().values():
        options = serving.model.session.get_session_options()
        assert options.get_session_config_entry("session.use_env_allocators") == "1"


def test_the_access_log_names_the_version_that_answered(
    loaded: str, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="app.access"):
        client.post("/rerank", json={"user_id": "l", "candidates": ["1", "2"]})
        client.get("/healthz")
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert any(
        line.startswith("POST /rerank 200 ") and f"model={VERSION_A}" in line for line in lines
    )
    assert not any("model=" in line for line in lines if "/healthz" in line)
