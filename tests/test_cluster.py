"""Redis Cluster: the HTTP contract of test_api.py, unchanged, against three local masters.

The session's cluster is three redis-servers started with ``--cluster-enabled yes`` and joined
with redis-py (tests.redis_servers.EmbeddedCluster). Every test of tests/test_api.py is collected
again here, with the fixtures below in place of conftest's: the service is configured with a
``redis+cluster://`` URL and the model is loaded through the cluster client. Then a master goes
away and comes back, and a 20k-item catalogue loads and serves (the 1M-item
run's results are in loadtest/results/cluster-2026-11-28.json).
"""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from app.factory import create_app, make_store, redis_client
from app.loader import load_into_redis
from app.metrics import Metrics
from app.store import ClusterStore
from tests import test_api
from tests.conftest import VERSION_A, make_settings
from tests.redis_servers import EmbeddedCluster, paused

# The contract tests, collected again in this module (so this module's fixtures apply).
globals().update({name: f for name, f in vars(test_api).items() if name.startswith("test_")})


@dataclass
class SeedNode:
    """What test_api.py reads as ``redis_server``: ``url`` is a plain client's URL.

    test_api.py reads one key itself with ``redis.Redis.from_url(redis_server.url)``; a plain
    client only reaches its own node's slots, so ``prefix`` below puts that key there.
    """

    url: str
    port: int


@pytest.fixture(scope="session")
def cluster() -> Iterator[EmbeddedCluster]:
    with closing(EmbeddedCluster(masters=3).start()) as c:
        yield c


def owned_slots(port: int) -> set[int]:
    with redis.Redis(port=port) as r:
        slots: set[int] = set()
        for start, end, *nodes in r.execute_command("CLUSTER SLOTS"):
            if int(nodes[0][1]) == port:
                slots.update(range(int(start), int(end) + 1))
        return slots


@pytest.fixture
def redis_server(cluster: EmbeddedCluster) -> SeedNode:
    port = cluster.nodes[0].port
    return SeedNode(f"redis://127.0.0.1:{port}/0", port)


@pytest.fixture
def prefix(redis_server: SeedNode) -> str:
    """A fresh prefix whose history key of user "ev" lives on the seed node (see SeedNode)."""
    slots = owned_slots(redis_server.port)
    while True:
        candidate = f"t{uuid.uuid4().hex[:12]}"
        if key_slot(f"{candidate}:h:ev".encode()) in slots:
            return candidate


@pytest.fixture
def redis_url(cluster: EmbeddedCluster) -> str:
    return cluster.url


def cluster_client(c: EmbeddedCluster) -> redis.RedisCluster:
    return redis.RedisCluster(host="127.0.0.1", port=c.nodes[0].port)


def test_vectors_spread_over_every_master(
    cluster: EmbeddedCluster, prefix: str, model_dir: Path
) -> None:
    load_into_redis(cluster.url, model_dir / VERSION_A, prefix)
    per_node = []
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as r:
            per_node.append(len(list(r.scan_iter(f"{prefix}:v:*", count=1000))))
    assert sum(per_node) == 200 and min(per_node) > 30, per_node
    rc = cluster_client(cluster)
    try:
        assert rc.get(f"{prefix}:active") == VERSION_A.encode()
    finally:
        rc.close()


def test_setting_selects_cluster_with_a_plain_url(
    cluster: EmbeddedCluster, prefix: str, model_dir: Path
) -> None:
    plain = f"redis://127.0.0.1:{cluster.nodes[1].port}"
    load_into_redis(plain, model_dir / VERSION_A, prefix, cluster=True)
    settings = make_settings(plain, prefix, model_dir, redis_cluster=True)
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").json()["ready"] is True
        body = c.post("/rerank", json={"user_id": "u", "candidates": ["1", "2", "3"]}).json()
        assert not body["degraded"] and body["model_version"] == VERSION_A


def test_fetch_reads_history_then_vectors_by_slot(
    cluster: EmbeddedCluster, prefix: str, model_dir: Path
) -> None:
    manifest = load_into_redis(cluster.url, model_dir / VERSION_A, prefix)
    table = np.load(model_dir / VERSION_A / "item_vectors.npy").astype(np.float32)
    settings = make_settings(cluster.url, prefix, model_dir)

    async def main() -> None:
        client = redis_client(cluster.url, settings)
        assert isinstance(client, RedisCluster)
        store = make_store(client, settings, Metrics())
        assert isinstance(store, ClusterStore)
        executed: list[int] = []
        original = client.pipeline

        def counted(**kwargs: Any) -> Any:
            pipe = original(**kwargs)
            run = pipe.execute

            async def execute(*args: Any, **kwargs: Any) -> Any:
                executed.append(len(pipe))
                return await run(*args, **kwargs)

            pipe.execute = execute  # type: ignore[method-assign]
            return pipe

        client.pipeline = counted  # type: ignore[method-assign]
        try:
            await store.prepare()
            await store.append_history("u", ["5", "6", "nope", "7"], keep=8)
            executed.clear()
            got = await store.fetch(manifest, "u", None, ["1", "x", "2"])
            # The list and one MGET per candidate slot, then one MGET per history slot.
            assert executed == [1 + 3, 4]
            assert got.hist_ids == ["5", "6", "7"]
            np.testing.assert_array_equal(got.hist, table[[4, 5, 6]])
            assert got.cand_present.tolist() == [True, False, True]
            np.testing.assert_array_equal(got.cand, table[[0, 1]])
            executed.clear()
            await store.fetch(manifest, "u", None, ["1", "2"])
            # Candidates cached: the list alone, then only "nope" (it has no vector to cache).
            assert executed == [1, 1]
            executed.clear()
            await store.fetch(manifest, "u", ["5", "6"], ["1", "2"])
            assert executed == []  # history given and cached: no round trip
        finally:
            await client.aclose()

    asyncio.run(main())


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout_s:g} s")
        time.sleep(0.1)


def test_a_master_goes_away_and_comes_back(model_dir: Path) -> None:
    """No replicas, so no failover: answers degrade, readiness drops, then both recover."""
    with closing(EmbeddedCluster(masters=3).start()) as own:
        prefix = "gone"
        load_into_redis(own.url, model_dir / VERSION_A, prefix)
        settings = make_settings(own.url, prefix, model_dir, cache_size=0)  # read every shard
        body = {"user_id": "u", "candidates": [str(i) for i in range(1, 41)], "k": 5}
        with TestClient(create_app(settings)) as c:
            assert c.post("/events", json={"user_id": "u", "item_ids": ["3", "4"]}).is_success
            assert not c.post("/rerank", json=body).json()["degraded"]
            assert c.get("/readyz").status_code == 200

            own.nodes[2].stop()  # every request reads keys of all three shards
            answer = c.post("/rerank", json=body)
            assert answer.status_code == 200
            assert answer.json()["degraded"] is True
            assert [i["item_id"] for i in answer.json()["items"]] == body["candidates"][:5]
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] is False

            own.nodes[2].start()  # same port and folder: its slots and data come back
            own.wait_ok()
            wait_for(lambda: c.get("/readyz").status_code == 200, 15, "ready again")
            wait_for(
                lambda: not c.post("/rerank", json=body).json()["degraded"], 15, "scored again"
            )
            after = c.post("/rerank", json=body).json()
            assert after["model_version"] == VERSION_A and after["missing"] == []


def test_a_paused_master_is_degraded_within_the_deadline(model_dir: Path) -> None:
    with closing(EmbeddedCluster(masters=3).start()) as own:
        load_into_redis(own.url, model_dir / VERSION_A, "paused")
        settings = make_settings(own.url, "paused", model_dir, cache_size=0)
        body = {"user_id": "u", "candidates": [str(i) for i in range(1, 41)]}
        with TestClient(create_app(settings)) as c:
            assert not c.post("/rerank", json=body).json()["degraded"]
            with paused(own.nodes[1]):
                start = time.monotonic()
                assert c.post("/rerank", json=body).json()["degraded"] is True
                assert time.monotonic() - start < 1.0
            wait_for(
                lambda: not c.post("/rerank", json=body).json()["degraded"], 15, "scored again"
            )


def test_a_20k_catalogue_loads_and_serves(
    cluster: EmbeddedCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The small version of the 1M-item run in loadtest/results/cluster-2026-11-28.json."""
    from training.export import export_random_model

    root = tmp_path_factory.mktemp("big")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        export_random_model(root, 20_000, dim=16, history_len=8, version="big", seed=3)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    manifest = load_into_redis(cluster.url, root / "big", prefix)
    assert manifest.n_items == 20_000
    counts = []
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as r:
            counts.append(sum(1 for _ in r.scan_iter(f"{prefix}:v:*", count=5000)))
    assert sum(counts) == 20_000 and min(counts) > 5000, counts
    settings = make_settings(cluster.url, prefix, root, cache_size=0)
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").json()["ready"] is True
        cands = [str(i) for i in range(1, 20_001, 400)] + ["not-an-item"]
        body = c.post("/rerank", json={"user_id": "u", "candidates": cands, "k": 60}).json()
        assert not body["degraded"] and body["missing"] == ["not-an-item"]
        assert len(body["items"]) == 51


def test_a_split_and_online_hits_over_the_cluster(
    cluster: EmbeddedCluster, prefix: str, model_dir: Path
) -> None:
    """The version verbs without a transaction, a split's two arms, a hit counted once."""
    from app.errors import VersionRefused
    from app.split import Split
    from app.store import Keys
    from app.versions import drop, set_split
    from tests.conftest import VERSION_B

    load_into_redis(cluster.url, model_dir / VERSION_A, prefix)
    load_into_redis(cluster.url, model_dir / VERSION_B, prefix, activate=False, name="b-copy")
    admin = cluster_client(cluster)
    keys = Keys(prefix)
    try:
        set_split(admin, keys, Split(((VERSION_A, 50), ("b-copy", 50))))
        settings = make_settings(cluster.url, prefix, model_dir)
        with TestClient(create_app(settings)) as c:
            seen: dict[str, str] = {}
            for i in range(40):
                body = {"user_id": f"s{i}", "candidates": ["1", "2", "3"], "k": 3}
                answer = c.post("/rerank", json=body).json()
                assert not answer["degraded"]
                seen[f"s{i}"] = answer["model_version"]
            assert set(seen.values()) == {VERSION_A, "b-copy"}
            user = next(u for u, v in seen.items() if v == "b-copy")
            wait_for(lambda: admin.exists(f"{prefix}:imp:{user}") == 1, 10, "remembered")
            top = c.post("/rerank", json={"user_id": user, "candidates": ["1", "2", "3"]})
            first = top.json()["items"][0]["item_id"]
            wait_for(
                lambda: admin.hget(f"{prefix}:imp:{user}", first) == b"1 b-copy", 10, "replaced"
            )
            assert c.post("/events", json={"user_id": user, "item_ids": [first]}).is_success
            wait_for(lambda: admin.hget(f"{prefix}:ab:b-copy", "hits") == b"1", 10, "counted")
        with pytest.raises(VersionRefused, match="live"):
            drop(admin, keys, "b-copy")
    finally:
        admin.close()
