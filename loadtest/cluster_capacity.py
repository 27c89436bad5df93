"""Load a synthetic catalogue into a local 3-master Redis Cluster and serve from it.

Measures what docs/capacity.md needs from Redis Cluster: load time, INFO memory
(used_memory) per shard and per item, the CPU of one request's reads (client process and
all shards, with the vector cache off and warm), and a few reranks through the whole service (in
process, one client at a time) with their latency, with the vector cache off (every vector
read from the cluster) and on. Writes loadtest/results/cluster-<date>.json.

    python loadtest/cluster_capacity.py            # 1M items, D=64 float16, 3 masters
    python loadtest/cluster_capacity.py --items 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.factory import create_app, make_store, redis_client
from app.loader import load_into_redis as load_model
from app.metrics import Metrics
from contract import verify_folder
from tests.redis_servers import EmbeddedCluster

ITEMS = 1_000_000
DIM = 64
HISTORY_LEN = 50
MASTERS = 3
CANDIDATES = 100
RERANKS = 300
USERS = 100
STORE_FETCHES = 300
SEED = 0
RESULTS = Path(__file__).parent / "results"


def used_memory(cluster: EmbeddedCluster) -> list[int]:
    out = []
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as r:
            out.append(int(r.info("memory")["used_memory"]))
    return out


def key_counts(cluster: EmbeddedCluster) -> list[int]:
    out = []
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as r:
            out.append(int(r.dbsize()))
    return out


def server_cpu_s(cluster: EmbeddedCluster) -> float:
    total = 0.0
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as r:
            cpu = r.info("cpu")
            total += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return total


def store_costs(cluster: EmbeddedCluster, model_dir: Path, items: int) -> list[dict[str, Any]]:
    """CPU per fetch of the ClusterStore alone (client process, all shards), cache off or warm."""
    manifest = verify_folder(model_dir)
    rng = random.Random(SEED)
    out = []
    for cache_size in (0, 100_000):
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            redis_url=cluster.url,
            cache_size=cache_size,
            redis_timeout_ms=1000,
        )

        async def run(settings: Settings = settings) -> tuple[float, float]:
            client = redis_client(cluster.url, settings)
            store = make_store(client, settings, Metrics())
            await store.prepare()
            history = [str(rng.randint(1, items)) for _ in range(HISTORY_LEN)]
            await store.append_history("u", history, HISTORY_LEN)
            cands = [str(rng.randint(1, items)) for _ in range(CANDIDATES)]
            await store.fetch(manifest, "u", None, cands)  # warms the cache when it is on
            server, client_cpu = server_cpu_s(cluster), time.process_time()
            for _ in range(STORE_FETCHES):
                await store.fetch(manifest, "u", None, cands)
            client_cpu = time.process_time() - client_cpu
            server = server_cpu_s(cluster) - server
            await client.aclose()
            return client_cpu, server

        client_cpu, server = asyncio.run(run())
        out.append(
            {
                "cache_size": cache_size,
                "keys_read_per_fetch": 1 + (CANDIDATES + HISTORY_LEN) * (cache_size == 0),
                "fetches": STORE_FETCHES,
                "client_cpu_ms_per_fetch": round(client_cpu / STORE_FETCHES * 1000, 3),
                "server_cpu_ms_per_fetch": round(server / STORE_FETCHES * 1000, 3),
            }
        )
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve(url: str, model_dir: Path, items: int, cache_size: int) -> dict[str, Any]:
    """RERANKS sequential /rerank calls of CANDIDATES random items; latency in ms."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=url,
        model_dir=model_dir,
        cache_size=cache_size,
        redis_timeout_ms=200,
        onnx_threads=1,
    )
    rng = random.Random(SEED)
    latencies, degraded = [], 0
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["ready"], "service not ready"
        for user in range(USERS):
            history = [str(rng.randint(1, items)) for _ in range(HISTORY_LEN)]
            client.post("/events", json={"user_id": f"u{user}", "item_ids": history})
        for i in range(RERANKS):
            body = {
                "user_id": f"u{i % USERS}",
                "candidates": [str(rng.randint(1, items)) for _ in range(CANDIDATES)],
                "k": 10,
            }
            start = time.perf_counter()
            answer = client.post("/rerank", json=body).json()
            latencies.append((time.perf_counter() - start) * 1000)
            degraded += bool(answer["degraded"])
    return {
        "cache_size": cache_size,
        "reranks": RERANKS,
        "degraded": degraded,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "mean_ms": round(statistics.fmean(latencies), 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=ITEMS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from training.export import export_random_model  # torch: only to make the catalogue

    with tempfile.TemporaryDirectory(prefix="cluster-capacity-") as tmp:
        root = Path(tmp)
        version = f"synthetic-{args.items}"
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_random_model(root, args.items, DIM, HISTORY_LEN, version, SEED)
        export_s = time.perf_counter() - start
        print(f"exported {args.items} items in {export_s:.1f} s", flush=True)
        with EmbeddedCluster(masters=MASTERS) as cluster:
            before = used_memory(cluster)
            start = time.perf_counter()
            manifest = load_model(cluster.url, root / version, "rr")
            load_s = time.perf_counter() - start
            after = used_memory(cluster)
            print(f"loaded in {load_s:.1f} s", flush=True)
            per_shard = [a - b for a, b in zip(after, before, strict=True)]
            costs = store_costs(cluster, root / version, args.items)
            runs = [serve(cluster.url, root, args.items, size) for size in (0, 100_000)]
            keys = key_counts(cluster)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "params": {
            "items": args.items,
            "dim": DIM,
            "vector_dtype": manifest.vector_dtype,
            "vector_bytes": manifest.vector_bytes,
            "masters": MASTERS,
            "replicas": 0,
            "history_len": HISTORY_LEN,
            "candidates": CANDIDATES,
        },
        "items_loaded": manifest.n_items,
        "load_s": round(load_s, 1),
        "load_items_per_s": round(manifest.n_items / load_s),
        "keys_per_shard": keys,
        "used_memory_before": before,
        "used_memory_after": after,
        "vector_memory_per_shard": per_shard,
        "bytes_per_item": round(sum(per_shard) / manifest.n_items, 1),
        "store": costs,
        "serve": runs,
        "notes": "In-process TestClient, one request at a time, on a shared 2-core box while "
        "other jobs run: latencies are an upper bound, not the service's throughput "
        "(see loadtest/bench.py). used_memory counts keys, values and Redis's per-key overhead.",
    }
    out = args.out or RESULTS / f"cluster-{datetime.now(UTC).date()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
