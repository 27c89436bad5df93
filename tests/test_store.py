"""Store: one round trip per request, zero on a cache hit, the deadline, decoding."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from redis.asyncio import Redis

from app.embedded import EmbeddedRedis
from app.errors import StoreUnavailable
from app.factory import create_app
from app.loader import load_into_redis
from app.metrics import Metrics
from app.store import BREAKER_FAILURES, Store, VectorCache
from contract import HASHED_FILES, Manifest
from tests.conftest import N_ITEMS, VERSION_A, make_settings
from tests.redis_servers import paused

T = TypeVar("T")


def run(
    url: str,
    prefix: str,
    body: Callable[[Store, list[str]], Awaitable[T]],
    timeout_s: float = 1.0,
    retry_s: float = 0.0,
) -> T:
    """Run ``body(store, calls)`` with a fresh client; ``calls`` records each round trip."""

    async def main() -> T:
        client = Redis.from_url(url)
        calls: list[str] = []
        original = client.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(str(args[0]))
            return await original(*args, **kwargs)

        client.execute_command = counted  # type: ignore[method-assign]
        store = Store(client, prefix, timeout_s, VectorCache(1000), Metrics(), retry_s=retry_s)
        try:
            return await body(store, calls)
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.fixture
def manifest(redis_server: EmbeddedRedis, prefix: str, model_dir: Path) -> Manifest:
    return load_into_redis(redis_server.url, model_dir / "test-a", prefix)


def vectors(model_dir: Path, ids: list[str]) -> np.ndarray:
    table = np.load(model_dir / "test-a" / "item_vectors.npy").astype(np.float32)
    return table[[int(i) - 1 for i in ids]]  # ids "1".."200" are rows 0..199


def test_one_round_trip_then_none(
    redis_server: EmbeddedRedis, prefix: str, manifest: Manifest, model_dir: Path
) -> None:
    async def body(store: Store, calls: list[str]) -> None:
        await store.prepare()
        await store.append_history("u", ["5", "6", "nope", "7"], keep=manifest.history_len)
        calls.clear()
        cands = ["1", "x", "2"]
        got = await store.fetch(manifest, "u", None, cands)
        assert calls == ["EVALSHA"]  # history list and every vector: one round trip
        assert got.hist_ids == ["5", "6", "7"]  # oldest first, the one without a vector dropped
        np.testing.assert_array_equal(got.hist, vectors(model_dir, ["5", "6", "7"]))
        assert got.cand_present.tolist() == [True, False, True]
        np.testing.assert_array_equal(got.cand, vectors(model_dir, ["1", "2"]))

        calls.clear()
        again = await store.fetch(manifest, "u", ["5", "6", "7"], ["1", "2"])
        assert calls == []  # history given and every vector cached: no round trip
        np.testing.assert_array_equal(again.cand, got.cand)

        calls.clear()
        await store.fetch(manifest, "u", ["8", "5"], ["1", "3"])
        assert calls == ["MGET"]  # only the uncached ones, in one MGET

    run(redis_server.url, prefix, body)


def test_history_is_trimmed_and_newest_last(
    redis_server: EmbeddedRedis, prefix: str, manifest: Manifest
) -> None:
    async def body(store: Store, calls: list[str]) -> None:
        items = [str(i) for i in range(1, 21)]
        assert await store.append_history("t", items, keep=manifest.history_len) == 8
        got = await store.fetch(manifest, "t", None, ["1"])
        assert got.hist_ids == items[-8:]
        given = await store.fetch(manifest, "t", items, ["1"])  # a long given history too
        assert given.hist_ids == items[-8:]

    run(redis_server.url, prefix, body)


def test_a_vector_of_the_wrong_size_counts_as_missing(
    redis_server: EmbeddedRedis, prefix: str, manifest: Manifest
) -> None:
    async def body(store: Store, calls: list[str]) -> None:
        await store.client.set(f"{prefix}:v:test-a:odd", b"\x00" * 5)
        got = await store.fetch(manifest, "u", [], ["odd", "1"])
        assert got.cand_present.tolist() == [False, True] and got.cand.shape == (1, 16)

    run(redis_server.url, prefix, body)


def test_paused_redis_is_unavailable_within_the_deadline(
    own_redis: EmbeddedRedis, prefix: str, model_dir: Path
) -> None:
    m = load_into_redis(own_redis.url, model_dir / "test-a", prefix)

    async def body(store: Store, calls: list[str]) -> None:
        await store.ping()
        with paused(own_redis):
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(StoreUnavailable, match="within 50 ms"):
                await store.fetch(m, "u", None, ["1"])
            assert loop.time() - start < 1.0

    run(own_redis.url, prefix, body, timeout_s=0.05)


def test_a_redis_without_answers_is_not_called_until_the_retry(
    own_redis: EmbeddedRedis, prefix: str, model_dir: Path
) -> None:
    """Three calls in a row without an answer open the breaker: the next fails at once, with
    no round trip, and is counted; after ``retry_s`` a call goes to Redis again."""
    m = load_into_redis(own_redis.url, model_dir / "test-a", prefix)

    async def body(store: Store, calls: list[str]) -> None:
        await store.ping()
        loop = asyncio.get_running_loop()
        with paused(own_redis):
            for _ in range(BREAKER_FAILURES):
                with pytest.raises(StoreUnavailable, match="within 50 ms"):
                    await store.fetch(m, "u", None, ["1"])
            calls.clear()
            start = loop.time()
            with pytest.raises(StoreUnavailable, match="not called"):
                await store.fetch(m, "u", None, ["2"])
            assert loop.time() - start < 0.05 and calls == []
        assert store.metrics.redis_skipped._value.get() == 1
        with pytest.raises(StoreUnavailable, match="not called"):  # Redis is back, not yet tried
            await store.fetch(m, "u", None, ["3"])
        await asyncio.sleep(0.3)
        got = await store.fetch(m, "u", None, ["4"])
        assert "EVALSHA" in calls and got.cand_present.tolist() == [True]  # called again

    run(own_redis.url, prefix, body, timeout_s=0.05, retry_s=0.25)


def test_errors_redis_answers_with_leave_the_breaker_closed(
    redis_server: EmbeddedRedis, prefix: str, manifest: Manifest
) -> None:
    """An error answer (a string where the history list is) shows Redis is there."""

    async def body(store: Store, calls: list[str]) -> None:
        await store.client.set(f"{prefix}:h:typo", "not a list")
        for _ in range(BREAKER_FAILURES + 2):
            with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
                await store.fetch(manifest, "typo", None, ["1"])
        assert (await store.fetch(manifest, "u", None, ["1"])).cand_present.tolist() == [True]
        assert store.metrics.redis_skipped._value.get() == 0

    run(redis_server.url, prefix, body, retry_s=10.0)


def test_cache_is_a_bounded_lru() -> None:
    cache = VectorCache(2)
    cache.put("v", "a", b"a")
    cache.put("v", "b", b"b")
    assert cache.get("v", "a") == b"a"  # a is now the most recent
    cache.put("v", "c", b"c")
    assert cache.get("v", "b") is None and cache.get("v", "a") == b"a" and len(cache) == 2
    assert cache.get("other", "a") is None  # keyed by version too
    off = VectorCache(0)
    off.put("v", "a", b"a")
    assert off.get("v", "a") is None


def test_cache_batched_reads_and_writes() -> None:
    cache = VectorCache(3)
    cache.put_many("v", ["a", "b", "c", "d"], [b"a", None, b"c", b""])  # no None, no empty
    assert cache.get_many("v", ["a", "b", "c", "d"]) == [b"a", None, b"c", None]
    assert len(cache) == 2
    cache.put_many("v", ["a", "e"], [b"a", b"e"])  # a again: counted once, now the most recent
    assert len(cache) == 3
    cache.put_many("v2", ["x"], [b"x"])  # full: the other version's oldest entry goes first
    assert cache.get_many("v", ["c", "a", "e"]) == [None, b"a", b"e"]
    assert cache.get_many("v2", ["x"]) == [b"x"] and len(cache) == 3
    cache.put_many("v2", ["y", "z"], [b"y", b"z"])  # then v is emptied and dropped
    assert cache.get_many("v", ["a", "e"]) == [None, None] and len(cache) == 3


def test_decode_keeps_only_values_of_the_right_length() -> None:
    from app.store import decode

    sha256 = dict.fromkeys(HASHED_FILES, "0" * 64)
    manifest = Manifest(version="v", dim=2, history_len=5, vector_dtype="float16", n_items=3,
                        sha256=sha256)  # fmt: skip
    a, b = np.array([1, 2], "<f2").tobytes(), np.array([3, 4], "<f2").tobytes()
    present, matrix = decode([a, b], manifest)  # every value fine: the fast path
    assert present.tolist() == [True, True] and matrix.tolist() == [[1, 2], [3, 4]]
    assert matrix.dtype == np.float32
    present, matrix = decode([a, None, b[:3], b + b, b], manifest)
    assert present.tolist() == [True, False, False, False, True]
    assert matrix.tolist() == [[1, 2], [3, 4]]
    present, matrix = decode([], manifest)
    assert present.tolist() == [] and matrix.shape == (0, 2)


def test_an_append_sets_the_history_expiry_again(
    redis_server: EmbeddedRedis, prefix: str, loaded: str, settings_factory: Callable[..., Any]
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    key = f"{prefix}:h:u1"
    try:
        with TestClient(create_app(settings_factory(history_ttl_days=2))) as client:
            assert client.post("/events", json={"user_id": "u1", "item_ids": ["1"]}).is_success
            assert 2 * 86400 - 60 < r.ttl(key) <= 2 * 86400
            r.expire(key, 5)  # as if the user had been away for most of the two days
            assert client.post("/events", json={"user_id": "u1", "item_ids": ["2"]}).is_success
            assert 2 * 86400 - 60 < r.ttl(key) <= 2 * 86400
            assert r.lrange(key, 0, -1) == [b"2", b"1"]
        with TestClient(create_app(settings_factory(history_ttl_days=0))) as client:
            assert client.post("/events", json={"user_id": "u2", "item_ids": ["1"]}).is_success
            assert r.ttl(f"{prefix}:h:u2") == -1  # 0: never expires
    finally:
        r.close()


def test_a_full_redis_evicts_only_histories_then_refuses_writes_plainly(
    prefix: str, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """maxmemory with volatile-lru: histories (which expire) go, vectors and manifests stay;
    with nothing left to evict, /events is a 503 that names no key and quotes no Redis text."""
    with EmbeddedRedis(maxmemory_mb=2) as server:
        load_into_redis(server.url, model_dir / VERSION_A, prefix)
        r = redis.Redis.from_url(server.url)
        try:
            model_keys = list(r.scan_iter(f"{prefix}:*", count=1000))
            assert len(model_keys) > N_ITEMS  # the vectors, the manifest, the active pointer
            settings = make_settings(server.url, prefix, model_dir)
            with TestClient(create_app(settings)) as client:
                # About 3 MB of histories into 2 MB: the least recently used are evicted.
                pipe = r.pipeline(transaction=False)
                for u in range(3000):
                    pipe.rpush(f"{prefix}:h:old{u}", *[f"{j:0>120}" for j in range(8)])
                    pipe.expire(f"{prefix}:h:old{u}", 3600)
                pipe.execute()
                assert r.info("stats")["evicted_keys"] > 0
                events = {"user_id": "secret-user", "item_ids": ["1", "2"]}
                assert client.post("/events", json=events).status_code == 200
                assert r.exists(*model_keys) == len(model_keys)

                # Keys without an expiry until the memory is full: nothing is left to evict.
                with pytest.raises(redis.ResponseError, match="maxmemory"):
                    for i in range(10_000):
                        r.set(f"junk:{i}", b"x" * 10_000)
                # Well under what is used now: a refused command's freed buffers do not bring
                # the memory back under the limit.
                r.config_set("maxmemory", "1mb")
                with caplog.at_level("WARNING", logger="app.errors"):
                    response = client.post("/events", json=events)
                assert "maxmemory" in caplog.text  # the detail is in the log
                assert response.status_code == 503 and "Retry-After" in response.headers
                detail = response.json()["detail"]
                for leaked in (prefix, "secret-user", "OOM", "maxmemory", "LPUSH", "Command"):
                    assert leaked not in detail, detail
                assert r.exists(*model_keys) == len(model_keys)
                # Reads still work: /rerank scores from the vectors that stayed.
                answer = client.post("/rerank", json={"user_id": "u", "candidates": ["1", "2"]})
                assert answer.status_code == 200 and not answer.json()["degraded"]
        finally:
            r.close()


def test_online_feedback_round_trips(
    redis_server: EmbeddedRedis, prefix: str, manifest: Manifest
) -> None:
    """/events reads the remembered answer in its one round trip; a hit counts once."""
    from app.store import Hit, Remembered

    async def body(store: Store, calls: list[str]) -> None:
        ops: list[str] = []
        original = store._call

        async def recorded(op: str, awaitable: Any, timeout_s: float | None = None) -> Any:
            ops.append(op)
            return await original(op, awaitable, timeout_s)

        store._call = recorded  # type: ignore[method-assign]
        answer = Remembered("u", "test-a", ("3", "1", "2"))
        await store.remember_answers([answer], ttl_s=60, timeout_s=1.0)
        assert ops == ["remember"]
        length, found = await store.append_events("u", ["9", "2"], keep=8, lookup=True)
        assert ops == ["remember", "events"] and length == 2
        assert found == [None, b"3 test-a"]
        # The script writes what Remembered.entries names: a repeated id keeps its first.
        again = Remembered("w", "test-a", ("5", "6", "5", "7"))
        await store.remember_answers([again], ttl_s=60, timeout_s=1.0)
        stored = await store.client.hgetall(f"{prefix}:imp:w")
        assert {k.decode(): v.decode() for k, v in stored.items()} == again.entries()
        assert 0 < await store.client.ttl(f"{prefix}:imp:w") <= 60
        hit = Hit("u", "test-a", 3)
        both = await asyncio.gather(store.count_hits([hit], 1.0), store.count_hits([hit], 1.0))
        assert sorted(len(c) for c in both) == [0, 1]  # one DEL removed it: counted once
        ab = await store.client.hgetall(f"{prefix}:ab:test-a")
        assert ab[b"impressions"] == b"2" and ab[b"hits"] == b"1" and ab[b"hits:2-3"] == b"1"
        assert float(ab[b"rr"]) == pytest.approx(1 / 3)
        assert await store.client.exists(f"{prefix}:imp:u") == 0
        ops.clear()
        assert await store.append_events("v", ["1"], keep=8, lookup=False) == (1, [])
        assert ops == ["events"]

    run(redis_server.url, prefix, body)
