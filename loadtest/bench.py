"""`make bench`: the service beside its floors and a naive peer, in one run, on one traffic.

    python -m loadtest.bench          # writes loadtest/results/<date>-<machine>.{json,md,png}

What it does, in order, every server started and stopped by ``loadtest.harness``:

1. Traffic: builds ``loadtest/traffic/<name>.json`` once (item-kNN recall lists over
   MovieLens-100K when ``data/ml100k`` exists, else a popularity-skewed random draw; the
   file says which), and feeds every load below from it.
2. A redis-server of its own, the model loaded into it (what ``rerank load`` does), the
   users' histories stored.
3. The service (``rerank serve``), driven open loop (``loadtest.load``) over a ladder of
   offered rates up to saturation; per rate: achieved throughput, latency percentiles from
   the due time, errors, degraded, shed, service CPU per request, the generator's own CPU
   and send lag, and the batch sizes the service formed (its /metrics). Then the cost per
   request against the number of candidates, and a closed-loop curve (1 to 256 callers that
   send again as soon as they are answered): goodput and the p99 of the 200s per level; with
   a model that has an item tower, /rerank's p99 at the half rung's rate alone and beside
   ``--items-rate`` POST /items calls a second (``--items-only``: this comparison alone).
   Then the same requests with recall features (each candidate an ``{"id", "features"}``
   object carrying every feature the model declares, or the fused pipeline's ten names for
   a model without features), beside the plain ids at the same rate: CPU per request.
4. The floors, on the same traffic, through the service's own code: (1) the model alone,
   its padding and batch run (``app.model.LoadedModel.run_batch``) at the batch sizes the
   service formed, (2) Redis alone, the service's reads (``app.store.Store``), (3) HTTP
   alone, the same bodies through the same server stack to an endpoint that does nothing.
5. The naive peer (``loadtest/peers/naive.py``) through the same ladder.
6. ``--workers 2``; a synthetic catalogue (1M random vectors under their own version and key
   prefix, Redis memory per item from INFO memory, a worker with a full 100k-entry cache).

Numbers are ratios taken side by side in one run; on a shared machine the absolute values
move, which is why nothing here is ever a timed assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import uvloop

from contract import Manifest, default_version, sha256_file, verify_folder
from loadtest import load
from loadtest import traffic as tf
from loadtest.harness import ROOT, Harness, cpu_seconds, harness, read_metrics, relative

# ---- Parameters (each one is also a flag; `--smoke` shrinks them to seconds) ----------------
MODEL_DIR = ROOT / "models"  # a models/ root (DEFAULT names the version) or one version
OUT_DIR = ROOT / "loadtest" / "results"
TRAFFIC_DIR = tf.TRAFFIC_DIR
DATA_DIR = ROOT / "data"
TRAFFIC_SOURCE = "auto"  # auto | knn | random
N_REQUESTS = 20_000  # distinct requests in the traffic file (the generator cycles)
MAX_CANDIDATES = 1000  # longest recall list stored per user; requests take the first N
CANDIDATES = 100  # candidates per /rerank in the ladders
K = 10
ZIPF_S = 1.0  # user popularity: rank r has weight 1 / r**s
EVENTS_SHARE = 0.02  # share of /events writes
SEED = 0
DURATION_S = 8.0  # seconds per rung
WARMUP_S = 2.0
LADDER_START = 20.0  # req/s of the first rung; each next rung offers FACTOR times more
LADDER_FACTOR = 1.5
MAX_RUNGS = 10
REFINE = 2  # bisection rungs between the last rung within the SLO and the first past it
# The half rung is the one the standards read (its p99, the CPU per request): three times
# the samples of a ladder rung, so that its p99 is not decided by one stall of the machine.
HALF_RUNG_FACTOR = 3
PAUSE_S = 0.5  # between rungs
EFFICIENCY_STANDARD = 1.75  # most service CPU per request over the sum of the hot floors
PEER_START = 5.0
SLO_P99_MS = 50.0
CLOSED_CONNECTIONS = (1, 4, 16, 64, 256)  # the closed-loop curve's levels
CLOSED_DURATION_S = 4.0  # per level and round
CLOSED_ROUNDS = 3
CLOSED_GOODPUT_SHARE = 0.9  # of the peak, at every level from the peak's on
SWEEP_CANDIDATES = (50, 100, 200, 500, 1000)
SWEEP_RATE = 50.0  # req/s for the cost-per-request curves
SWEEP_DURATION_S = 6.0
CATALOGUE = 1_000_000  # synthetic catalogue size; 0 skips it
CATALOGUE_USERS = 2000
CACHE_FILL = 1000  # requests of 100 distinct items each before the catalogue rung
FILL_RATE = 100.0  # req/s of the cache fill (each one misses 100 vectors)
WORKERS = (1, 2)
FLOOR_BUDGET_S = 6.0  # seconds per floor measurement (model, Redis), paced and hot
REDIS_CONCURRENCY = 8
MAX_CONNS = 512
SPLIT_SUFFIX = "-b"  # --split: the model a second time under this suffix, 50/50 by user
# /rerank beside a stream of POST /items (one new item each), against /rerank alone at the
# same rate: the encoder's worker thread must not move /rerank's p99 (a model without an
# item tower skips it). --items-only runs this comparison and nothing else.
ITEMS_RATE = 20.0  # /items calls a second; 0 skips it
ITEMS_RERANK_RATE = 100.0  # /rerank req/s of the comparison under --items-only
ITEMS_DURATION_S = 30.0  # seconds of each side (alone, beside) over all the rounds
ITEMS_ROUNDS = 6
# The recall features a fused model declares (training/fusion.py): rank and score for each of
# its five channels. A model without features is sent these, ignored and counted.
FEATURE_NAMES = [f"{c}_{k}" for c in ("ease", "markov", "sasrec", "item_knn", "als")
                 for k in ("rank", "score")]  # fmt: skip


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# ---- Load -----------------------------------------------------------------------------------


def payloads(
    traffic: dict[str, Any],
    port: int,
    candidates: int,
    k: int,
    limit: int,
    features: list[str] | None = None,
) -> list[bytes]:
    return [
        load.render(port, "POST", path, body)
        for path, body in tf.bodies(traffic, candidates, k, limit, features)
    ]


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """What a rung added to the service's counters and histograms."""
    if before is None or after is None:
        return {}
    return {
        name: value - before.get(name, 0.0)
        for name, value in after.items()
        if name.startswith("rerank_")
    }


async def rung(
    port: int, requests: list[bytes], rate: float, duration: float, pids: dict[str, list[int]],
    metrics: bool, max_conns: int,
) -> dict[str, Any]:  # fmt: skip
    """One open-loop rung: the generator's figures, the servers' CPU, the service's metrics."""
    before = await read_metrics(port) if metrics else None
    cpu0 = {name: cpu_seconds(group) for name, group in pids.items()}
    run = await load.open_loop(port, requests, rate, duration, max_conns=max_conns)
    cpu = {name: cpu_seconds(group) - cpu0[name] for name, group in pids.items()}
    after = await read_metrics(port) if metrics else None
    result = run.summary(rate)
    result["cpu_s"] = cpu
    result["cpu_ms_per_request"] = {k: 1000 * v / max(1, result["ok"]) for k, v in cpu.items()}
    result["metrics"] = delta(before, after)
    lat, gen = result["latency_ms"], result["generator"]
    log(
        f"  {rate:8.1f} rps offered  {result['achieved_rps']:8.1f} achieved  "
        f"p50 {lat['p50']:7.2f}  p99 {lat['p99']:8.2f} ms  err {result['errors']} "
        f"shed {result['shed']} degr {result['degraded']}  gen cpu {gen['cpu_cores']:.2f} "
        f"lag p99 {gen['send_lag_ms']['p99']:.2f} ms"
    )
    await asyncio.sleep(PAUSE_S)
    return result


def drive(
    args: argparse.Namespace,
    port: int,
    traffic: dict[str, Any],
    pids: dict[str, list[int]],
    *,
    candidates: int | None = None,
    rates: list[float] | None = None,
    start: float | None = None,
    duration: float | None = None,
    half: bool = False,
    metrics: bool = True,
    refine: int | None = None,
    warmup: float | None = None,
    features: list[str] | None = None,
) -> dict[str, Any]:
    """A warm-up, then the ladder (or the given ``rates``), then, with ``half``, one long
    rung at half the max throughput within the SLO."""
    requests = payloads(
        traffic, port, candidates or args.candidates, args.k, args.n_requests, features
    )
    seconds = duration or args.duration

    async def one(rate: float, length: float = seconds) -> dict[str, Any]:
        return await rung(port, requests, rate, length, pids, metrics, args.max_conns)

    async def main() -> dict[str, Any]:
        warm = args.warmup if warmup is None else warmup
        if warm > 0:
            await one(rates[0] if rates else start or args.start, warm)
        result = await load.ladder(
            one, start=start or args.start, factor=args.factor, max_rungs=args.max_rungs,
            refine=args.refine if refine is None else refine, slo_ms=args.slo_ms, rates=rates,
        )  # fmt: skip
        best = result["max_rps_within_slo"]
        result["half"] = await one(best / 2, HALF_RUNG_FACTOR * seconds) if half and best else None
        return result

    return uvloop.run(main())


def items_bodies(port: int, n: int, tag: str) -> list[bytes]:
    """``n`` POST /items calls, each one new item with a title, genres and a year."""
    genres = ["Drama", "Comedy", "Sci-Fi", "Thriller", "Romance"]
    return [
        load.render(port, "POST", "/items", json.dumps({"items": [{
            "item_id": f"bench-{tag}-{i}", "text": f"Bench film {i} ({1950 + i % 50})",
            "attributes": {"genres": [genres[i % 5]], "year": 1950 + i % 50},
        }]}).encode())
        for i in range(n)
    ]  # fmt: skip


def items_beside(
    args: argparse.Namespace, port: int, traffic: dict[str, Any], rate: float
) -> dict[str, Any]:
    """/rerank at ``rate`` alone and beside ``args.items_rate`` /items calls a second, in
    ``args.items_rounds`` rounds whose order alternates (alone first, then beside first):
    this box's speed moves from one minute to the next by more than the effect measured
    (docs/benchmark.md, Spread between runs), so each round's p99 beside is divided by the
    p99 alone of the same round, and the figure is the median of those ratios."""
    requests = payloads(traffic, port, args.candidates, args.k, args.n_requests)
    seconds = args.items_duration / args.items_rounds
    per_round = max(1, round(args.items_rate * seconds))
    adds = items_bodies(port, per_round * args.items_rounds + 2, f"{time.time_ns()}")

    async def alone() -> load.Run:
        return await load.open_loop(port, requests, rate, seconds)

    async def beside(n: int) -> tuple[load.Run, load.Run]:
        calls = adds[2 + n * per_round : 2 + (n + 1) * per_round]
        reranked, added = await asyncio.gather(
            load.open_loop(port, requests, rate, seconds),
            load.open_loop(port, calls, args.items_rate, seconds),
        )
        return reranked, added

    async def main() -> list[tuple[load.Run, load.Run, load.Run]]:
        await load.open_loop(port, requests, rate, args.warmup)  # warm, and the encoder too
        await load.open_loop(port, adds[:2], 2.0, 1.0)
        rounds = []
        for n in range(args.items_rounds):
            if n % 2 == 0:
                a = await alone()
                b, added = await beside(n)
            else:
                b, added = await beside(n)
                a = await alone()
            rounds.append((a, b, added))
        return rounds

    rounds = uvloop.run(main())
    summaries = [
        {"alone": a.summary(rate), "beside": b.summary(rate),
         "items": added.summary(args.items_rate)}
        for a, b, added in rounds
    ]  # fmt: skip
    ratios = [
        r["beside"]["latency_ms"]["p99"] / max(r["alone"]["latency_ms"]["p99"], 1e-9)
        for r in summaries
    ]
    pooled = {
        "alone": pooled_p99([a for a, _, _ in rounds]),
        "beside": pooled_p99([b for _, b, _ in rounds]),
    }
    items = pooled_p99([added for _, _, added in rounds])
    during = overlapping([b for _, b, _ in rounds], [added for _, _, added in rounds])
    result = {
        "rerank_rps": rate,
        "items_rps": args.items_rate,
        "seconds_per_turn": seconds,
        "rounds": summaries,
        "round_p99_ratios": ratios,
        "p99_ratio": float(np.median(ratios)),
        "rerank_p99_ms": pooled,
        "pooled_p99_ratio": pooled["beside"] / max(pooled["alone"], 1e-9),
        "beside_by_overlap": during,
        "items_p99_ms": items,
        "rerank_errors": {k: sum(r[k]["errors"] for r in summaries) for k in ("alone", "beside")},
        "items_errors": sum(r["items"]["errors"] for r in summaries),
    }
    log(
        f"  /rerank p99 beside {args.items_rate:g} /items a second / alone, median of "
        f"{len(ratios)} rounds: {result['p99_ratio']:.2f}x (rounds "
        f"{', '.join(f'{r:.2f}' for r in ratios)}); pooled {pooled['alone']:.2f} ms alone, "
        f"{pooled['beside']:.2f} ms beside; /items p99 {items:.1f} ms, "
        f"{result['items_errors']} errors"
    )
    return result


def pooled_p99(runs: list[load.Run]) -> float:
    """The p99 in ms of every request of ``runs`` together."""
    return load.pct(np.concatenate([r.latency() for r in runs]), 99) or 0.0


def overlapping(reranks: list[load.Run], adds: list[load.Run]) -> dict[str, Any]:
    """The beside turns' /rerank requests split by whether an /items call was in flight
    while they were: count, p50 and p99 (ms) of each part."""
    calls = np.concatenate([np.stack([a.sent, a.done], 1) for a in adds])  # (C, 2)
    sent = np.concatenate([r.sent for r in reranks])
    done = np.concatenate([r.done for r in reranks])
    latency = np.concatenate([r.latency() for r in reranks])
    hit = ((calls[None, :, 0] < done[:, None]) & (calls[None, :, 1] > sent[:, None])).any(1)
    return {
        name: {"requests": int(part.sum()), "p50_ms": load.pct(latency[part], 50),
               "p99_ms": load.pct(latency[part], 99)}
        for name, part in (("with /items in flight", hit), ("without", ~hit))
    }  # fmt: skip


def run_items_only(args: argparse.Namespace) -> Path:
    """``--items-only``: the /items comparison alone, at ``--items-rerank-rate``."""
    folder, manifest, traffic = model_and_traffic(args)
    if manifest.item_tower is None:
        raise SystemExit(f"{folder.name} has no item tower: nothing to measure")
    with harness("rr", name="rerank-bench-items") as h:
        load_measured(h, folder, "rr")
        store_histories(h, "rr", traffic["users"])
        with h.serving("service-items", h.env(folder.parent)) as svc:
            result = items_beside(args, svc.port, traffic, args.items_rerank_rate)
            result["worker_rss_mb"] = svc.rss_mb()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{datetime.now(UTC):%Y-%m-%d}-{args.machine}-items.json"
    out.write_text(json.dumps({"model": folder.name, **result}, indent=2) + "\n")
    log(f"wrote {relative(out)}")
    return out


async def closed_level(
    port: int, requests: list[bytes], connections: int, seconds: float,
    pids: dict[str, list[int]],
) -> dict[str, Any]:  # fmt: skip
    """One closed-loop run of ``connections`` callers: goodput (200s per second), the
    latency of the 200s, the counts, and each process group's CPU per 200."""
    cpu0 = {name: cpu_seconds(group) for name, group in pids.items()}
    run = await load.closed_loop(port, requests, connections, seconds)
    cpu = {name: cpu_seconds(group) - cpu0[name] for name, group in pids.items()}
    s = run.summary()
    return {
        "connections": connections,
        "goodput_rps": s["achieved_rps"],
        "ok_latency_ms": s["ok_latency_ms"],
        "requests": s["requests"], "ok": s["ok"], "shed": s["shed"],
        "errors": s["errors"], "degraded": s["degraded"],
        "cpu_ms_per_request": {k: 1000 * v / max(1, s["ok"]) for k, v in cpu.items()},
        "generator": s["generator"],
    }  # fmt: skip


def closed_curve(
    args: argparse.Namespace, port: int, traffic: dict[str, Any], pids: dict[str, list[int]]
) -> dict[str, Any]:
    """Goodput (200s per second) and the p99 of the 200s at each number of callers, over
    ``args.closed_rounds`` rounds that take the levels up, then down, then up: this box's
    speed moves from one minute to the next (docs/benchmark.md, Spread between runs), and a
    single pass compares levels run in different phases. Each level keeps the round with
    its median goodput, and the p99 of the 200s of every round."""
    requests = payloads(traffic, port, args.candidates, args.k, args.n_requests)

    async def main() -> dict[int, list[dict[str, Any]]]:
        turns: dict[int, list[dict[str, Any]]] = {n: [] for n in args.closed_connections}
        for r in range(args.closed_rounds):
            order = args.closed_connections[:: -1 if r % 2 else 1]
            for n in order:
                level = await closed_level(port, requests, n, args.closed_duration, pids)
                turns[n].append(level)
                p99 = fmt(level["ok_latency_ms"]["p99"], 2)
                log(f"  {n:4d} callers  goodput {level['goodput_rps']:8.1f} req/s  "
                    f"p99 of the 200s {p99} ms  shed {level['shed']}")  # fmt: skip
                await asyncio.sleep(PAUSE_S)
        return turns

    levels = [median_turn(turns) for turns in uvloop.run(main()).values()]
    peak = max(levels, key=lambda lv: lv["goodput_rps"])
    return {"levels": levels, "rounds": args.closed_rounds,
            "peak_goodput_rps": peak["goodput_rps"],
            "peak_connections": peak["connections"]}  # fmt: skip


def median_turn(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """The turn of median goodput (the lower middle of an even count), with every turn's
    goodput and p99 of the 200s beside it."""
    ranked = sorted(turns, key=lambda t: t["goodput_rps"])
    return {
        **ranked[(len(ranked) - 1) // 2],
        "round_goodput_rps": [t["goodput_rps"] for t in turns],
        "round_ok_p99_ms": [t["ok_latency_ms"]["p99"] for t in turns],
    }


# ---- Model, traffic, Redis ------------------------------------------------------------------


def model_folder(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    version = default_version(path)
    if version is None or not (path / version / "manifest.json").is_file():
        raise SystemExit(
            f"no model in {path}: train one (make train) or pass --model-dir to a version "
            "folder (e.g. one made by training.export.export_random_model)"
        )
    return path / version


def model_and_traffic(args: argparse.Namespace) -> tuple[Path, Manifest, dict[str, Any]]:
    """The model folder ``--model-dir`` names, its verified manifest, and the traffic on its
    items (built first when the file is absent)."""
    folder = model_folder(args.model_dir)
    manifest = verify_folder(folder)
    item_ids = (folder / "item_ids.txt").read_text().splitlines()
    return folder, manifest, tf.read(build_traffic(args, manifest, item_ids))


def parse_with_bench_flags(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``p``'s own flags from ``argv``; the rest, bench's traffic and model flags
    (``--model-dir``, ...), kept as ``bench_args`` for ``parse``, and ``argv`` as given."""
    args, rest = p.parse_known_args(argv)
    args.bench_args = rest
    args.argv = argv
    return args


def build_traffic(args: argparse.Namespace, manifest: Manifest, item_ids: list[str]) -> Path:
    source = args.traffic_source
    if source == "auto":
        source = "knn" if (args.data_dir / "ml100k").is_dir() else "random"
    tag = "ml100k-knn" if source == "knn" else f"random-{manifest.version}"
    path = args.traffic_dir / f"{tag}-{args.max_candidates}-{args.n_requests}-s{args.seed}.json"
    if path.exists():
        log(f"traffic: {relative(path)} (exists)")
        return path
    log(f"traffic: building {relative(path)} ({source})")
    shape = tf.Shape(args.max_candidates, manifest.history_len, args.n_requests, args.zipf_s,
                     args.events_share, args.seed)  # fmt: skip
    if source == "knn":
        data = tf.build_knn(args.data_dir, shape)
    else:
        data = tf.build_random(item_ids, 943, shape)
    return tf.write(data, path)


def store_histories(h: Harness, prefix: str, users: dict[str, list[str]]) -> None:
    """Each user's history as the service keeps it: newest first (replaces what /events added)."""
    with h.client() as client:
        pipe = client.pipeline(transaction=False)
        for user, history in users.items():
            key = f"{prefix}:h:{user}"
            pipe.delete(key)
            if history:
                pipe.lpush(key, *history)
        pipe.execute()


def load_measured(h: Harness, folder: Path, prefix: str) -> dict[str, Any]:
    """Load a model version; Redis memory per item from INFO memory before and after."""
    with h.client() as client:
        before = int(client.info("memory")["used_memory"])
        start = time.perf_counter()
        manifest = h.load(folder, prefix)
        took = time.perf_counter() - start
        after = int(client.info("memory")["used_memory"])
    return {
        "version": manifest.version,
        "items": manifest.n_items,
        "vector_bytes": manifest.vector_bytes,
        "redis_used_memory_delta_mb": (after - before) / 1e6,
        "redis_bytes_per_item": (after - before) / manifest.n_items,
        "load_s": took,
    }


def split_versions(h: Harness, folder: Path, prefix: str) -> None:
    """The model loaded again under another name and a 50/50 split between the two: what an
    A/A test costs against one version (the same model, so only the split's cost differs)."""
    from app.loader import load_into_redis
    from app.split import Split
    from app.store import Keys
    from app.versions import set_split

    other = folder.name + SPLIT_SUFFIX
    load_into_redis(h.url, folder, prefix, activate=False, name=other)
    with h.client() as client:
        set_split(client, Keys(prefix), Split(((folder.name, 50), (other, 50))))
    log(f"split: {folder.name}=50 {other}=50")


def synthetic_model(src: Path, root: Path, n_items: int, seed: int) -> Path:
    """The source model's ONNX graph with ``n_items`` random vectors, as its own version; no
    item tower (the catalogue's vectors are random, not the tower's)."""
    manifest = json.loads((src / "manifest.json").read_text())
    manifest.pop("item_tower", None)
    version = f"synthetic-{n_items}"
    folder = root / version
    folder.mkdir(parents=True)
    shutil.copy(src / "model.onnx", folder / "model.onnx")
    real = np.load(src / "item_vectors.npy").astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = np.empty((n_items, manifest["dim"]), dtype=manifest["vector_dtype"])
    for at in range(0, n_items, 100_000):  # in slices: no 1M x D float64 temporary
        rows = min(100_000, n_items - at)
        block = rng.standard_normal((rows, manifest["dim"]), dtype=np.float32)
        vectors[at : at + rows] = block * real.std(axis=0) + real.mean(axis=0)
    np.save(folder / "item_vectors.npy", vectors)
    (folder / "item_ids.txt").write_text("".join(f"{i}\n" for i in range(1, n_items + 1)))
    manifest.update(
        version=version,
        n_items=n_items,
        dataset="synthetic: random vectors, the graph of " + manifest["version"],
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        sha256={
            n: sha256_file(folder / n) for n in ("model.onnx", "item_vectors.npy", "item_ids.txt")
        },
    )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    verify_folder(folder)
    return folder


# ---- Floors ---------------------------------------------------------------------------------


def batch_shares(metrics: dict[str, float], max_batch: int) -> dict[int, float]:
    """Share of requests scored in batches of each size, from the batch-size histogram.

    A bucket (lo, hi] stands for its middle size: the histogram's resolution.
    """
    cumulative = []
    for name, value in metrics.items():
        match = re.fullmatch(r'rerank_batch_size_bucket\{le="([^"]+)"\}', name)
        if match and match.group(1) != "+Inf":
            cumulative.append((float(match.group(1)), value))
    cumulative.sort()
    shares: dict[int, float] = {}
    lo, below = 0.0, 0.0
    for hi, count in cumulative:
        batches = count - below
        size = min(max_batch, int(round((lo + 1 + hi) / 2)) if hi - lo > 1 else int(hi))
        if batches > 0:
            shares[size] = shares.get(size, 0.0) + batches * size
        lo, below = hi, count
    total = sum(shares.values())
    return {size: v / total for size, v in sorted(shares.items())} if total else {1: 1.0}


def floor_model(
    folder: Path,
    manifest: Manifest,
    traffic: dict[str, Any],
    n_cand: int,
    shares: dict[int, float],
    budget_s: float,
    rate: float,
) -> dict[str, Any]:
    """The model alone at the service's batch sizes: CPU and wall time per request.

    Through the service's own code: the session as ``app.model.load_session`` opens it with
    the service's settings, and ``LoadedModel.run_batch``, which pads a batch's jobs to the
    service's buckets, runs it and cuts each job's rows back out. Two ways for each batch
    size: ``paced``, one batch every ``size / rate`` seconds, the spacing the service's
    batches had at ``rate`` req/s; and ``hot``, back to back. The paced one is the floor: a
    run on a core that did other work (or slept) since the last one finds its caches cold,
    and a service at ``rate`` cannot run hot. The hot figure is kept as the lower bound.
    """
    from app.config import Settings
    from app.model import Job, LoadedModel, load_session

    settings = Settings()
    session = load_session(folder / "model.onnx", ["CPUExecutionProvider"], settings.onnx_threads)
    model = LoadedModel(manifest, session, settings.max_candidates)
    vectors = np.load(folder / "item_vectors.npy").astype(np.float32)
    row = {item: i for i, item in enumerate((folder / "item_ids.txt").read_text().splitlines())}
    jobs: list[Job] = []
    for req in traffic["requests"]:
        if req[0] == "r" and len(jobs) < 512:
            hist = [row[i] for i in traffic["users"][req[1]][-manifest.history_len :] if i in row]
            cand = [row[i] for i in traffic["recall"][req[1]][:n_cand] if i in row]
            if cand:
                jobs.append(
                    Job(vectors[hist], vectors[cand], np.arange(len(cand), dtype=np.float32))
                )
    per_size: dict[int, dict[str, Any]] = {}
    for size, share in shares.items():
        batches = [jobs[at : at + size] for at in range(0, min(len(jobs), 8 * size), size)]
        batches = [b for b in batches if len(b) == size]  # up to 8 distinct full batches
        if not batches:
            continue
        for batch in batches:  # first runs allocate
            model.run_batch(batch)
        slice_s = budget_s * max(share, 0.1) / 2
        hot = _model_runs(model, batches, slice_s, interval_s=0.0)
        paced = _model_runs(model, batches, slice_s, interval_s=size / rate)
        per_size[size] = {
            "share_of_requests": share,
            "interval_ms": 1000 * size / rate,
            **_per_request(paced, size),
            "hot": _per_request(hot, size),
        }
    total = sum(v["share_of_requests"] for v in per_size.values()) or 1.0

    def mean(get: Any) -> float:
        return sum(v["share_of_requests"] * get(v) for v in per_size.values()) / total

    return {
        "onnx_threads": settings.onnx_threads,
        "rate": rate,
        "batch_sizes": per_size,
        "cpu_ms_per_request": mean(lambda v: v["cpu_ms"]),
        "wall_ms_per_request": mean(lambda v: v["wall_ms"]),
        "hot_cpu_ms_per_request": mean(lambda v: v["hot"]["cpu_ms"]),
    }


def _per_request(runs: dict[str, float], size: int) -> dict[str, float]:
    """_model_runs' per-run figures of batches of ``size``, as per-request ones."""
    return {
        "runs": runs["runs"],
        "batch_ms": runs["wall_ms"],
        "cpu_ms": runs["cpu_ms"] / size,
        "wall_ms": runs["wall_ms"] / size,
    }


def _model_runs(
    model: Any, batches: list[Any], slice_s: float, interval_s: float
) -> dict[str, float]:
    """Run the batches in turn, one every ``interval_s`` (0: back to back); per-run CPU, wall."""
    runs, cpu, wall = 0, 0.0, 0.0
    start = time.perf_counter()
    while runs < 5 or time.perf_counter() - start < slice_s:
        pause = start + runs * interval_s - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        c0, w0 = time.process_time(), time.perf_counter()  # intra-op threads included
        model.run_batch(batches[runs % len(batches)])
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        runs += 1
    return {"runs": runs, "cpu_ms": 1000 * cpu / runs, "wall_ms": 1000 * wall / runs}


async def _store_reads(
    url: str, prefix: str, manifest: Manifest, traffic: dict[str, Any], n_cand: int,
    cached: bool, budget_s: float, concurrency: int, redis_pid: int, interval_s: float,
) -> dict[str, Any]:  # fmt: skip
    """The service's reads through its own ``Store``, ``concurrency`` at a time back to
    back, or (``interval_s`` > 0) one every ``interval_s``: then CPU counts from each call
    to its answer only, so the pacing's own timer wake-ups are left out. ``cached``: every
    vector in the store's cache first, as a warm service has them."""
    from app.config import Settings
    from app.factory import make_store, redis_client
    from app.metrics import Metrics

    settings = Settings(
        _env_file=None, redis_url=url, key_prefix=prefix, redis_timeout_ms=5000,  # type: ignore[call-arg]
        cache_size=10**7 if cached else 0,
    )  # fmt: skip
    client = redis_client(url, settings)
    store = make_store(client, settings, Metrics())
    await store.prepare()
    requests = traffic["requests"]
    counter = iter(range(10**9))
    latencies: list[float] = []
    paced_cpu: list[float] = []

    async def one(req: list[Any]) -> None:
        if req[0] == "e":  # what the service does for /events
            await store.append_history(req[1], req[2], manifest.history_len)
        else:
            await store.fetch(manifest, req[1], None, traffic["recall"][req[1]][:n_cand])

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            await one(requests[next(counter) % len(requests)])
            latencies.append(time.perf_counter() - t)

    async def paced() -> None:
        start = time.perf_counter()
        while time.perf_counter() < stop_at:
            i = next(counter)
            await asyncio.sleep(max(0.0, start + i * interval_s - time.perf_counter()))
            c, t = time.process_time(), time.perf_counter()
            await one(requests[i % len(requests)])
            latencies.append(time.perf_counter() - t)
            paced_cpu.append(time.process_time() - c)

    for req in requests[: 2000 if cached else 50]:  # connections warm, the cache filled
        await one(req)
    stop_at = time.perf_counter() + budget_s
    redis_proc = psutil.Process(redis_pid)
    rcpu0 = sum(redis_proc.cpu_times()[:2])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if interval_s > 0:
        await paced()
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rcpu = sum(redis_proc.cpu_times()[:2]) - rcpu0
    await client.aclose()
    n = len(latencies)
    lat = np.array(latencies) * 1000
    return {
        "requests": n,
        "rps": n / wall,
        "cpu_ms_per_request": 1000 * (sum(paced_cpu) if interval_s > 0 else cpu) / n,
        "redis_server_cpu_ms_per_request": 1000 * rcpu / n,
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))},
    }


def floor_redis(
    url: str, prefix: str, manifest: Manifest, traffic: dict[str, Any], n_cand: int,
    miss_share: float, budget_s: float, concurrency: int, redis_pid: int, rate: float,
) -> dict[str, Any]:  # fmt: skip
    """Redis alone: the service's reads through ``app.store.Store`` (redis-py, hiredis), on
    uvloop.

    ``warm``: every vector cached, so a /rerank reads the stored history and its vectors in
    one script call; ``cold``: no cache, so every candidate is read too. The floor mixes them
    at the service's own cache miss share, measured in the same rung. Like the model's, the
    floor is paced (one read every ``1 / rate`` seconds, as the service sent them); ``hot``,
    ``concurrency`` reads at a time back to back, is kept as the lower bound.
    """

    def read(cached: bool, concurrency: int, interval_s: float) -> dict[str, Any]:
        return uvloop.run(
            _store_reads(url, prefix, manifest, traffic, n_cand, cached, budget_s / 4,
                         concurrency, redis_pid, interval_s)
        )  # fmt: skip

    def mix(warm: dict[str, Any], cold: dict[str, Any]) -> float:
        w, c = warm["cpu_ms_per_request"], cold["cpu_ms_per_request"]
        return float(w + miss_share * (c - w))

    paced = {"warm": read(True, 1, 1 / rate), "cold": read(False, 1, 1 / rate)}
    hot = {"warm": read(True, concurrency, 0.0), "cold": read(False, concurrency, 0.0)}
    return {
        "miss_share": miss_share,
        "rate": rate,
        "cpu_ms_per_request": mix(**paced),
        "hot_cpu_ms_per_request": mix(**hot),
        **paced,
        "hot": hot,
    }


# ---- Summaries ------------------------------------------------------------------------------


def metric_sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def rung_summary(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of a rung without the raw metric samples."""
    m = r.get("metrics") or {}
    out = {k: v for k, v in r.items() if k != "metrics"}
    if m:
        count = m.get("rerank_batch_size_count", 0.0)
        hits = m.get("rerank_cache_hits_total", 0.0)
        misses = m.get("rerank_cache_misses_total", 0.0)
        out["mean_batch"] = m.get("rerank_batch_size_sum", 0.0) / count if count else None
        out["model_ms_per_batch"] = (
            1000 * m.get("rerank_model_seconds_sum", 0.0) / count if count else None
        )
        out["cache_miss_share"] = misses / (hits + misses) if hits + misses else None
    return out


def ladder_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "max_rps_within_slo": result["max_rps_within_slo"],
        "max_rps_sustained": sustained(result),
        "slo_p99_ms": result["slo_p99_ms"],
        "rungs": [rung_summary(r) for r in result["rungs"]],
        "half": rung_summary(result["half"]) if result.get("half") else None,
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def server_cpu(rung: dict[str, Any]) -> float | None:
    """CPU ms per request of the server a rung measured (its one named process group)."""
    return next(iter(rung["cpu_ms_per_request"].values()), None)


COST_COLUMNS = ["server CPU ms/req", "p50 ms", "p99 ms"]  # the cells of cost_cells


def section(title: str, intro: str, columns: list[str]) -> list[str]:
    """The lines that open a results section: a blank line, its title, an intro paragraph
    (none when empty) and a table's header."""
    return [
        "", f"## {title}", "", *([intro, ""] if intro else []),
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
    ]  # fmt: skip


def cost_cells(rung: dict[str, Any]) -> str:
    """A rung's server CPU ms per request, p50 and p99 ms, as table cells."""
    lat = rung["latency_ms"]
    return f"{fmt(server_cpu(rung), 3)} | {fmt(lat['p50'], 2)} | {fmt(lat['p99'], 2)}"


def ladder_table(ladder: dict[str, Any]) -> list[str]:
    rows = [
        "| offered req/s | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | "
        "degraded | shed | server CPU ms/req | mean batch | gen CPU cores | gen lag p99 ms |",
        "|" + "---|" * 13,
    ]
    rungs = list(ladder["rungs"]) + ([ladder["half"]] if ladder.get("half") else [])
    for r in rungs:
        lat = r["latency_ms"]
        cpu = server_cpu(r)
        rows.append(
            f"| {fmt(r['offered_rps'])} | {fmt(r['achieved_rps'])} | {fmt(lat['p50'], 2)} | "
            f"{fmt(lat['p90'], 2)} | {fmt(lat['p99'], 2)} | {fmt(lat['p99.9'], 2)} | "
            f"{r['errors']} | {r['degraded']} | {r['shed']} | {fmt(cpu, 3)} | "
            f"{fmt(r.get('mean_batch'), 1)} | {fmt(r['generator']['cpu_cores'], 2)} | "
            f"{fmt(r['generator']['send_lag_ms']['p99'], 2)} |"
        )
    return rows


def markdown(res: dict[str, Any]) -> str:
    s = res["standards"]
    lines = [
        f"# Benchmark {res['meta']['date']} on {res['meta']['machine']}",
        "",
        f"`{res['meta']['command']}`; model `{res['meta']['model_version']}`; traffic "
        f"`{res['meta']['traffic']['file']}` ({res['meta']['traffic']['source']}), "
        f"{res['params']['candidates']} candidates, k={res['params']['k']}, "
        f"{res['params']['events_share']:.0%} /events; {res['meta']['cpus']} CPUs "
        f"(load average at start {res['meta']['loadavg_start']}).",
        "",
        "## Against the standard",
        "",
        "| check | measured | standard | met | note |",
        "|---|---|---|---|---|",
    ]
    for check in s.values():
        lines.append(
            f"| {check['what']} | {fmt(check['value'], 2)} | {check['standard']} | "
            f"{'yes' if check['met'] else 'no'} | {check.get('note', '')} |"
        )
    f = res["floors"]
    lines += [
        "",
        "## CPU per request at half the service's max throughput",
        "",
        f"Floors 1 and 2 paced as the service's requests came ({fmt(f['at_offered_rps'])} "
        "req/s), and back to back (hot: a lower bound no service at this rate reaches).",
        "",
        "| part | CPU ms/request, paced | hot |",
        "|---|---|---|",
        f"| service (all its processes) | {fmt(f['service_cpu_ms_per_request'], 3)} | |",
        f"| floor 1: model alone | {fmt(f['model']['cpu_ms_per_request'], 3)} | "
        f"{fmt(f['model'].get('hot_cpu_ms_per_request'), 3)} |",
        f"| floor 2: Redis alone (client) | {fmt(f['redis']['cpu_ms_per_request'], 3)} | "
        f"{fmt(f['redis'].get('hot_cpu_ms_per_request'), 3)} |",
        f"| floor 3: HTTP alone | {fmt(f['http']['cpu_ms_per_request'], 3)} | (same) |",
        f"| sum of floors | {fmt(f['sum_cpu_ms_per_request'], 3)} | "
        f"{fmt(f.get('hot_sum_cpu_ms_per_request'), 3)} |",
        f"| service / sum | {fmt(f['service_over_floors'], 2)} | "
        f"{fmt(f.get('service_over_hot_floors'), 2)} |",
        "",
    ]
    for name, title in (("service", "Service, --workers 1"), ("peer", "Naive peer")):
        lines += [f"## {title}", "", *ladder_table(res[name]), ""]
    for entry in res["scaling"]["workers"]:
        if entry["workers"] != 1:
            lines += [f"## Service, --workers {entry['workers']}", "",
                      *ladder_table(entry["ladder"]), ""]  # fmt: skip
    lines += section(
        "Service, closed loop",
        "Each caller sends its next request as soon as the last is answered (Retry-After "
        "ignored); goodput counts the 200s. Each level shows its round of median goodput, "
        "and every round's goodput.",
        ["connections", "goodput req/s", "p50 of the 200s ms", "p99 of the 200s ms", "shed",
         "errors", "server CPU ms/200", "gen CPU cores", "goodput of each round"],
    )[1:]  # fmt: skip
    for lv in res["closed_loop"]["levels"]:
        lat = lv["ok_latency_ms"]
        rounds = ", ".join(fmt(g) for g in lv["round_goodput_rps"])
        lines.append(
            f"| {lv['connections']} | {fmt(lv['goodput_rps'])} | {fmt(lat['p50'], 2)} | "
            f"{fmt(lat['p99'], 2)} | {lv['shed']} | {lv['errors']} | {fmt(server_cpu(lv), 3)} "
            f"| {fmt(lv['generator']['cpu_cores'], 2)} | {rounds} |"
        )
    feat = res.get("features")
    if feat:
        lines += section(
            "Recall features in the requests",
            f"At {res['params']['sweep_rate']:g} req/s offered, {res['params']['candidates']} "
            f"candidates, each an object carrying {len(feat['names'])} features "
            f"({', '.join(feat['names'])}), beside the same requests as plain ids.",
            ["requests", *COST_COLUMNS],
        )
        for label in ("plain", "features"):
            lines.append(f"| {label} | {cost_cells(feat[label])} |")
    lines += section(
        "Cost per request against the number of candidates",
        f"At {res['params']['sweep_rate']:g} req/s offered.",
        ["candidates", *COST_COLUMNS, "mean batch"],
    )
    for r in res["scaling"]["candidates"]:
        lines.append(f"| {r['candidates']} | {cost_cells(r)} | {fmt(r.get('mean_batch'))} |")
    lines += section(
        "Cost per request against the catalogue size",
        "",
        ["catalogue", "Redis bytes/item", *COST_COLUMNS, "cache miss share", "worker RSS MB"],
    )
    for c in res["scaling"]["catalogue"]:
        r = c["rung"]
        lines.append(
            f"| {c['items']} | {fmt(c['redis_bytes_per_item'])} | {cost_cells(r)} | "
            f"{fmt(r.get('cache_miss_share'), 3)} | {fmt(c['worker_rss_mb'][0])} |"
        )
    lines += section(
        "--workers",
        "",
        ["workers", "max req/s with p99 <= SLO", "max req/s sustained", "worker RSS MB"],
    )
    for w in res["scaling"]["workers"]:
        rss = ", ".join(fmt(x) for x in w["worker_rss_mb"])
        lines.append(
            f"| {w['workers']} | {fmt(w['ladder']['max_rps_within_slo'])} | "
            f"{fmt(w['ladder']['max_rps_sustained'])} | {rss} |"
        )
    g = res["generator"]
    lines += [
        "",
        "## Load generator",
        "",
        f"Open loop, latency from the due time. Worst rung: {fmt(g['max_cpu_cores'], 2)} "
        f"cores of CPU, send lag p99 {fmt(g['max_send_lag_p99_ms'], 2)} ms (max "
        f"{fmt(g['max_send_lag_ms'], 2)} ms).",
        "",
    ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("service", res["service"]), ("naive peer", res["peer"])]
    series += [(f"service, {w['workers']} workers", w["ladder"])
               for w in res["scaling"]["workers"] if w["workers"] != 1]  # fmt: skip
    for label, ladder in series:
        rungs = ladder["rungs"]
        x = [r["offered_rps"] for r in rungs]
        (line,) = ax_lat.plot(
            x, [r["latency_ms"]["p99"] for r in rungs], "o-", label=f"{label} p99"
        )
        ax_lat.plot(x, [r["latency_ms"]["p50"] for r in rungs], "x--", color=line.get_color(),
                    label=f"{label} p50")  # fmt: skip
        ax_tp.plot(x, [r["achieved_rps"] for r in rungs], "o-", label=label)
    ax_lat.axhline(res["params"]["slo_ms"], color="grey", lw=0.8, ls=":")
    ax_lat.set(xscale="log", yscale="log", xlabel="offered load (req/s)", ylabel="latency (ms)",
               title="Latency from the due time (open loop)")  # fmt: skip
    top = max((r["offered_rps"] for _, ld in series for r in ld["rungs"]), default=1)
    ax_tp.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
    ax_tp.set(xlabel="offered load (req/s)", ylabel="achieved (req/s)", title="Throughput")
    for ax in (ax_lat, ax_tp):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['meta']['model_version']}, {res['params']['candidates']} candidates, "
                 f"{res['meta']['machine']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check(
    what: str, value: float | None, standard: str, met: bool, note: str = ""
) -> dict[str, Any]:
    return {"what": what, "value": value, "standard": standard, "met": bool(met), "note": note}


def efficiency_check(floors: dict[str, Any]) -> dict[str, Any]:
    """Issue 24's standard: service CPU per request <= EFFICIENCY_STANDARD x the sum of the hot
    floors at half the max throughput; the ratio to the paced floors beside it (it moves more
    from run to run)."""
    over_hot, over = floors["service_over_hot_floors"], floors["service_over_floors"]
    return check(
        "service CPU per request / sum of the hot floors (model, Redis client, HTTP no-op) "
        "at half the max throughput", over_hot, f"<= {EFFICIENCY_STANDARD:g}",
        over_hot is not None and over_hot <= EFFICIENCY_STANDARD,
        f"against the floors paced at the same rate: {fmt(over, 2)}",
    )  # fmt: skip


def closed_check(closed: dict[str, Any], slo_ms: float) -> dict[str, Any]:
    """Issue 23's standard: no collapse past the peak, and the 200s within the objective."""
    levels = closed["levels"]
    peak = closed["peak_goodput_rps"]
    from_peak = [lv for lv in levels if lv["connections"] >= closed["peak_connections"]]
    share = min(lv["goodput_rps"] for lv in from_peak) / peak if peak else 0.0
    p99s = [p for lv in levels for p in lv["round_ok_p99_ms"]]
    worst = max((p for p in p99s if p is not None), default=None)
    lowest = min(lv["goodput_rps"] for lv in levels) / peak if peak else 0.0
    return check(
        f"closed loop, {levels[0]['connections']}..{levels[-1]['connections']} connections: "
        "lowest goodput / peak, from the peak's level on (median of the rounds)", share,
        f">= {CLOSED_GOODPUT_SHARE:g}, p99 of the 200s <= {slo_ms:g} ms",
        share >= CLOSED_GOODPUT_SHARE and worst is not None and worst <= slo_ms,
        f"peak {peak:.0f} req/s at {closed['peak_connections']} connections; worst p99 of the "
        f"200s {fmt(worst, 1)} ms; lowest goodput / peak at any level {lowest:.2f}",
    )  # fmt: skip


def sustained(result: dict[str, Any]) -> float:
    """Highest throughput kept up with at any latency: >= 90% of offered, <= 1% refused."""
    kept = [
        r["achieved_rps"]
        for r in result["rungs"]
        if r["achieved_rps"] >= 0.9 * r["offered_rps"]
        and r["errors"] + r["shed"] <= 0.01 * r["requests"]
    ]
    return max(kept, default=0.0)


# ---- The run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Path:
    started = time.monotonic()
    loadavg = [round(x, 2) for x in os.getloadavg()]
    folder = model_folder(args.model_dir)
    manifest = verify_folder(folder)
    item_ids = (folder / "item_ids.txt").read_text().splitlines()
    traffic_path = build_traffic(args, manifest, item_ids)
    traffic = tf.read(traffic_path)
    known = set(item_ids)
    cands = [
        i for u in list(traffic["recall"])[:200] for i in traffic["recall"][u][: args.candidates]
    ]
    meta_traffic = {
        **traffic["meta"],
        "file": relative(traffic_path),
        "candidates_with_vector_share": sum(i in known for i in cands) / max(1, len(cands)),
    }
    prefix = "rr"
    with harness(prefix, name="rerank-bench") as h:
        log(f"redis-server {h.url}; loading {folder.name}")
        real_load = load_measured(h, folder, prefix)
        if args.split:
            split_versions(h, folder, prefix)
        store_histories(h, prefix, traffic["users"])
        env = h.env(folder.parent)
        redis_pid = h.redis.pid
        workers_results: list[dict[str, Any]] = []

        # -- the service, --workers 1: ladder, candidates sweep, closed-loop curve
        with h.serving("service-w1", env) as svc:
            pids = {"service": [svc.pid], "redis": [redis_pid]}
            log("service --workers 1: ladder")
            service = drive(args, svc.port, traffic, pids, half=True)
            rss_w1 = svc.rss_mb()
            log("service: cost against the number of candidates")
            sweep = []
            for n in args.sweep_candidates:
                store_histories(h, prefix, traffic["users"])
                r = drive(args, svc.port, traffic, pids, candidates=n, rates=[args.sweep_rate],
                          duration=args.sweep_duration, refine=0, warmup=1.0)  # fmt: skip
                sweep.append({"candidates": n, **rung_summary(r["rungs"][0])})
            log("service: closed loop")
            store_histories(h, prefix, traffic["users"])
            closed = closed_curve(args, svc.port, traffic, pids)
            items: dict[str, Any] | None = None
            if args.items_rate > 0 and manifest.item_tower is not None:
                half_rate = (service.get("half") or service["rungs"][0])["offered_rps"]
                log(f"service: /rerank at {half_rate:g} req/s beside {args.items_rate:g} /items/s")
                store_histories(h, prefix, traffic["users"])
                items = items_beside(args, svc.port, traffic, half_rate)
            names = manifest.feature_names or FEATURE_NAMES
            log(f"service: requests with {len(names)} recall features, beside plain ids")
            featured: dict[str, Any] = {"names": names}
            for label, feats in (("plain", None), ("features", names)):
                store_histories(h, prefix, traffic["users"])
                r = drive(args, svc.port, traffic, pids, rates=[args.sweep_rate],
                          duration=args.sweep_duration, refine=0, warmup=1.0,
                          features=feats)  # fmt: skip
                featured[label] = rung_summary(r["rungs"][0])
            plain_cpu, feat_cpu = server_cpu(featured["plain"]), server_cpu(featured["features"])
            featured["cpu_ratio"] = feat_cpu / plain_cpu if plain_cpu and feat_cpu else None
        workers_results.append({"workers": 1, "ladder": ladder_summary(service),
                                "worker_rss_mb": rss_w1})  # fmt: skip

        # -- the operating point: half of the max throughput within the SLO
        half = service.get("half") or service["rungs"][0]
        half_rate = half["offered_rps"]
        half_s = rung_summary(half)
        shares = batch_shares(
            half.get("metrics") or {}, int(os.environ.get("RERANK_MAX_BATCH", 32))
        )

        # -- floors
        log(f"floor 1: the model alone at the service's batch sizes {shares}")
        f_model = floor_model(
            folder, manifest, traffic, args.candidates, shares, args.floor_budget, half_rate
        )
        log("floor 2: Redis alone")
        store_histories(h, prefix, traffic["users"])
        f_redis = floor_redis(
            h.url, prefix, manifest, traffic, args.candidates,
            half_s.get("cache_miss_share") or 0.0, args.floor_budget,
            args.redis_concurrency, redis_pid, half_rate,
        )  # fmt: skip
        store_histories(h, prefix, traffic["users"])
        log(f"floor 3: HTTP alone at {half_rate:.1f} req/s")
        with h.serving("http-floor", env, app="loadtest.peers.nothing:app") as floor:
            http = drive(args, floor.port, traffic, {"http": [floor.pid]}, rates=[half_rate],
                         refine=0, metrics=False,
                         duration=HALF_RUNG_FACTOR * args.duration)  # fmt: skip
        f_http = rung_summary(http["rungs"][0])
        f_http["cpu_ms_per_request"] = f_http["cpu_ms_per_request"]["http"]

        # -- the naive peer
        log("naive peer: ladder")
        store_histories(h, prefix, traffic["users"])
        peer_env = {**env, "NAIVE_REDIS_URL": h.url, "NAIVE_MODEL": str(folder),
                    "NAIVE_PREFIX": prefix}  # fmt: skip
        with h.serving("naive-peer", peer_env, app="loadtest.peers.naive:app") as peer_srv:
            peer = drive(args, peer_srv.port, traffic, {"peer": [peer_srv.pid]},
                         start=args.peer_start, metrics=False)  # fmt: skip

        # -- more workers
        for w in args.workers:
            if w == 1:
                continue
            log(f"service --workers {w}: ladder")
            store_histories(h, prefix, traffic["users"])
            with h.serving(f"service-w{w}", env, workers=w) as svc:
                lad = drive(args, svc.port, traffic, {"service": [svc.pid]}, metrics=False)
                workers_results.append({"workers": w, "ladder": ladder_summary(lad),
                                        "worker_rss_mb": svc.rss_mb()})  # fmt: skip

        # -- catalogue size
        store_histories(h, prefix, traffic["users"])
        real_rung = next((s for s in sweep if s["candidates"] == args.candidates), None)
        catalogue = [{**real_load, "worker_rss_mb": rss_w1, "rung": real_rung}]
        if args.catalogue > 0:
            catalogue.append(synthetic_catalogue(args, h, folder, manifest))
        rss_check = catalogue[-1]["worker_rss_mb"][0]
        service_cpu = half_s["cpu_ms_per_request"]["service"]
        floors_sum = (
            f_model["cpu_ms_per_request"]
            + f_redis["cpu_ms_per_request"]
            + f_http["cpu_ms_per_request"]
        )
        # The HTTP floor is a server driven at the same rate: it has no hot variant.
        hot_sum = (
            f_model["hot_cpu_ms_per_request"]
            + f_redis["hot_cpu_ms_per_request"]
            + f_http["cpu_ms_per_request"]
        )
        svc_max, peer_max = service["max_rps_within_slo"], peer["max_rps_within_slo"]
        ratio = svc_max / peer_max if peer_max > 0 else None
        sustained_ratio = sustained(service) / sustained(peer) if sustained(peer) > 0 else None
        lowest = min(peer["rungs"], key=lambda r: r["offered_rps"])
        peer_note = (
            f"the peer met p99 <= {args.slo_ms:g} ms at no rate (lowest offered "
            f"{lowest['offered_rps']:g} req/s: p99 {lowest['latency_ms']['p99']:.0f} ms), so "
            "the ratio is unbounded; "
            if peer_max == 0
            else ""
        ) + f"at any latency, max sustained throughput service / peer = {fmt(sustained_ratio, 1)}"
        all_rungs = [
            r
            for ld in [service, peer, http]
            for r in ld["rungs"] + ([ld["half"]] if ld.get("half") else [])
        ] + [r for w in workers_results for r in w["ladder"]["rungs"]]
        results: dict[str, Any] = {
            "meta": {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": args.machine,
                "cpus": os.cpu_count(),
                "cpu_model": platform.processor() or platform.machine(),
                "loadavg_start": loadavg,
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "onnxruntime": __import__("onnxruntime").__version__,
                "model_version": manifest.version,
                "split": f"{manifest.version}=50 {manifest.version}{SPLIT_SUFFIX}=50"
                if args.split
                else None,
                "model_dir": relative(folder),
                "traffic": meta_traffic,
                "command": " ".join(["python", "-m", "loadtest.bench", *args.argv]),
                "wall_s": None,
            },
            "params": {
                k: (relative(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k != "argv"
            },  # fmt: skip
            "service": ladder_summary(service),
            "closed_loop": closed,
            "items_beside": items,
            "features": featured,
            "peer": ladder_summary(peer),
            "floors": {
                "at_offered_rps": half_rate,
                "service_cpu_ms_per_request": service_cpu,
                "model": f_model,
                "redis": f_redis,
                "http": f_http,
                "sum_cpu_ms_per_request": floors_sum,
                "service_over_floors": service_cpu / floors_sum if floors_sum else None,
                "hot_sum_cpu_ms_per_request": hot_sum,
                "service_over_hot_floors": service_cpu / hot_sum if hot_sum else None,
            },
            "scaling": {
                "candidates": sweep,
                "catalogue": catalogue,
                "workers": workers_results,
            },
            "generator": {
                "max_cpu_cores": max(r["generator"]["cpu_cores"] for r in all_rungs),
                "max_send_lag_p99_ms": max(r["generator"]["send_lag_ms"]["p99"] for r in all_rungs),
                "max_send_lag_ms": max(r["generator"]["send_lag_ms"]["max"] for r in all_rungs),
            },
        }
        results["standards"] = {
            "throughput_vs_peer": check(
                "max req/s with p99 <= 50 ms, service / naive peer", ratio, ">= 3",
                svc_max > 0 and (ratio is None or ratio >= 3), peer_note,
            ),
            "efficiency": efficiency_check(results["floors"]),
            "p99_at_half": check(
                f"p99 ms at half the max throughput ({half_rate:.0f} req/s offered)",
                half_s["latency_ms"]["p99"], "<= 15", (half_s["latency_ms"]["p99"] or 1e9) <= 15,
            ),
            "worker_rss": check(
                "resident MB of one worker" + (", 100k-entry cache full" if args.catalogue else ""),
                rss_check, "<= 400", rss_check <= 400,
            ),
            "closed_loop": closed_check(closed, args.slo_ms),
            "features": check(
                f"server CPU per request with {len(names)} recall features per candidate / "
                f"plain ids ({args.sweep_rate:g} req/s, {args.candidates} candidates)",
                featured["cpu_ratio"], "<= 1.1",
                featured["cpu_ratio"] is not None and featured["cpu_ratio"] <= 1.1,
                "the model declares them" if manifest.feature_names
                else "the model declares none: ignored and counted",
            ),
        }  # fmt: skip
        if items is not None:
            results["standards"]["items_beside"] = check(
                f"/rerank p99 beside {args.items_rate:g} /items a second / alone",
                items["p99_ratio"], "<= 1.2", items["p99_ratio"] <= 1.2,
                f"median of {len(items['round_p99_ratios'])} alternating rounds' ratios; "
                f"all requests pooled: {items['pooled_p99_ratio']:.2f}",
            )  # fmt: skip
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{args.machine}{'-split' if args.split else ''}"
    out = args.out_dir / f"{stem}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(results))
    plot(results, args.out_dir / f"{stem}.png")
    log(f"wrote {out} (+ .md, .png) in {results['meta']['wall_s']:.0f}s")
    return out


def synthetic_catalogue(
    args: argparse.Namespace, h: Harness, src: Path, manifest: Manifest
) -> dict[str, Any]:
    """A catalogue of ``args.catalogue`` random vectors under its own version and key prefix,
    served by its own service; the cache filled to its size first, then one rung."""
    log(f"catalogue of {args.catalogue} items: vectors, Redis load")
    root = h.work / "models-synthetic"
    folder = synthetic_model(src, root, args.catalogue, args.seed)
    prefix = "rrsyn"
    loaded = load_measured(h, folder, prefix)
    ids = [str(i) for i in range(1, args.catalogue + 1)]
    shape = tf.Shape(args.candidates, manifest.history_len, min(args.n_requests, 5000),
                     args.zipf_s, args.events_share, args.seed)  # fmt: skip
    syn = tf.build_random(ids, args.catalogue_users, shape)
    store_histories(h, prefix, syn["users"])
    # Fill the cache: requests of distinct items until it holds cache_size entries.
    fill_n = args.cache_fill
    fill = {
        "users": {},
        "recall": {
            f"f{i}": ids[(i * 100) % len(ids) : (i * 100) % len(ids) + 100] for i in range(fill_n)
        },  # fmt: skip
        "requests": [["r", f"f{i}"] for i in range(fill_n)],
    }
    with h.serving("service-synthetic", h.env(root, prefix)) as svc:
        drive(args, svc.port, fill, {"service": [svc.pid]}, candidates=100,
              rates=[args.fill_rate], duration=max(0.5, fill_n / args.fill_rate), refine=0,
              warmup=0.0)  # fmt: skip
        log("catalogue: one rung")
        r = drive(args, svc.port, syn, {"service": [svc.pid], "redis": [h.redis.pid]},
                  rates=[args.sweep_rate], duration=args.sweep_duration, refine=0,
                  warmup=1.0)  # fmt: skip
        rss = svc.rss_mb()
    return {**loaded, "worker_rss_mb": rss, "rung": rung_summary(r["rungs"][0]),
            "cache_filled_with": fill_n * 100, "traffic": syn["meta"]}  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model-dir", type=Path, default=MODEL_DIR, help="models/ root or one version folder")
    a("--out-dir", type=Path, default=OUT_DIR)
    a("--traffic-dir", type=Path, default=TRAFFIC_DIR)
    a("--data-dir", type=Path, default=DATA_DIR)
    a("--traffic-source", choices=("auto", "knn", "random"), default=TRAFFIC_SOURCE)
    a("--machine", default=re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "machine")
    a("--n-requests", type=int, default=N_REQUESTS)
    a("--max-candidates", type=int, default=MAX_CANDIDATES)
    a("--candidates", type=int, default=CANDIDATES)
    a("--k", type=int, default=K)
    a("--zipf-s", type=float, default=ZIPF_S)
    a("--events-share", type=float, default=EVENTS_SHARE)
    a("--seed", type=int, default=SEED)
    a("--duration", type=float, default=DURATION_S)
    a("--warmup", type=float, default=WARMUP_S)
    a("--start", type=float, default=LADDER_START)
    a("--factor", type=float, default=LADDER_FACTOR)
    a("--max-rungs", type=int, default=MAX_RUNGS)
    a("--refine", type=int, default=REFINE)
    a("--peer-start", type=float, default=PEER_START)
    a("--closed-connections", type=lambda s: [int(x) for x in s.split(",")],
      default=list(CLOSED_CONNECTIONS))  # fmt: skip
    a("--closed-duration", type=float, default=CLOSED_DURATION_S)
    a("--closed-rounds", type=int, default=CLOSED_ROUNDS)
    a("--slo-ms", type=float, default=SLO_P99_MS)
    a("--sweep-candidates", type=lambda s: [int(x) for x in s.split(",")],
      default=list(SWEEP_CANDIDATES))  # fmt: skip
    a("--sweep-rate", type=float, default=SWEEP_RATE)
    a("--sweep-duration", type=float, default=SWEEP_DURATION_S)
    a("--catalogue", type=int, default=CATALOGUE)
    a("--catalogue-users", type=int, default=CATALOGUE_USERS)
    a("--cache-fill", type=int, default=CACHE_FILL)
    a("--fill-rate", type=float, default=FILL_RATE)
    a("--workers", type=lambda s: [int(x) for x in s.split(",")], default=list(WORKERS))
    a("--floor-budget", type=float, default=FLOOR_BUDGET_S)
    a("--redis-concurrency", type=int, default=REDIS_CONCURRENCY)
    a("--max-conns", type=int, default=MAX_CONNS)
    a("--split", action="store_true",
      help="the model twice under two names, 50/50 by user (results file *-split)")  # fmt: skip
    a("--items-rate", type=float, default=ITEMS_RATE)
    a("--items-rerank-rate", type=float, default=ITEMS_RERANK_RATE)
    a("--items-duration", type=float, default=ITEMS_DURATION_S)
    a("--items-rounds", type=int, default=ITEMS_ROUNDS)
    a("--items-only", action="store_true", help="only /rerank beside /items (a model with an "
      "item tower), at --items-rerank-rate")  # fmt: skip
    a("--smoke", action="store_true", help="a tiny run in seconds (the test suite's)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n_requests = min(args.n_requests, 300)
        args.max_candidates = min(args.max_candidates, 100)
        args.duration, args.warmup, args.max_rungs, args.refine = 1.0, 0.3, 2, 0
        args.start, args.factor, args.peer_start = 20.0, 2.0, 10.0
        args.sweep_candidates, args.sweep_rate, args.sweep_duration = [50, 100], 20.0, 1.0
        args.catalogue = min(args.catalogue, 2000)
        args.catalogue_users, args.cache_fill, args.fill_rate = 50, 10, 20.0
        args.workers, args.floor_budget = [1], 0.2
        args.closed_connections, args.closed_duration, args.closed_rounds = [1, 4], 1.0, 1
        args.items_duration, args.items_rounds = 1.0, 2
        if args.traffic_source == "auto":
            args.traffic_source = "random"
    if args.candidates > args.max_candidates:
        p.error(f"--candidates={args.candidates} exceeds --max-candidates={args.max_candidates}")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.items_only:
        run_items_only(args)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
