"""`make bench`: the service beside its floors and a naive peer, in one run, on one traffic.

What it does, in order (every step in this process or a child it starts and stops itself):

1. Traffic: builds ``loadtest/traffic/<name>.json`` once (item-kNN recall lists over
   MovieLens-100K when ``data/ml100k`` exists, else a popularity-skewed random draw; the
   file says which), and feeds every load source below from it.
2. Starts its own redis-server (``app.embedded``), loads the model (``app.loader``, what
   ``rerank load`` does), stores the users' histories.
3. The service: a real ``rerank serve`` process, driven open-loop (``loadtest/gen.py``) over
   a ladder of offered rates up to saturation; per rate: achieved throughput, latency
   percentiles from the due time, errors, degraded, shed, service CPU per request, the
   generator's own CPU and send lag, and the batch sizes the service formed (/metrics).
   Then cost per request against the number of candidates.
4. The floors, on the same traffic: (1) the ONNX session alone at the batch sizes the
   service formed, (2) Redis alone: the same reads with the same client library, (3) HTTP
   alone: the same bodies through the same server stack to an endpoint that does nothing.
5. The naive peer (``loadtest/peers/naive.py``) through the same ladder.
6. ``--workers 2``; a synthetic catalogue (1M random vectors under their own version and key
   prefix, Redis memory per item from INFO memory, a worker with a full 100k-entry cache).
7. Writes ``loadtest/results/<date>-<machine>.json``, a Markdown summary and a PNG.

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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python loadtest/bench.py` puts loadtest/, not the root, first
    sys.path.insert(0, str(ROOT))

from app.embedded import EmbeddedRedis, free_port  # noqa: E402
from app.loader import load_into_redis as load_model  # noqa: E402
from contract import Manifest, default_version, sha256_file, verify_folder  # noqa: E402
from loadtest import traffic as tf  # noqa: E402
from loadtest.gen import HALF_RUNG_FACTOR  # noqa: E402

# ---- Parameters (each one is also a flag; `--smoke` shrinks them to seconds) ----------------
MODEL_DIR = ROOT / "models"  # a models/ root (DEFAULT names the version) or one version
OUT_DIR = ROOT / "loadtest" / "results"
TRAFFIC_DIR = ROOT / "loadtest" / "traffic"
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
PEER_START = 5.0
SLO_P99_MS = 50.0
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


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# ---- Processes ------------------------------------------------------------------------------


class Server:
    """A server process of this benchmark: started, awaited on a URL, stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, logs: Path):
        self.name, self.port = name, port
        self.log_path = logs / f"{name}.log"
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, path: str = "/readyz", timeout_s: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}{path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:g}s: {self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def processes(self) -> list[psutil.Process]:
        proc = psutil.Process(self.proc.pid)
        return [proc, *proc.children(recursive=True)]

    def workers(self) -> list[psutil.Process]:
        """The processes that serve requests: the children of a supervisor, else itself."""
        procs = self.processes()
        serving = [p for p in procs[1:] if p.memory_info().rss > 60e6]
        return serving or procs[:1]

    def rss_mb(self) -> list[float]:
        return [p.memory_info().rss / 1e6 for p in self.workers()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn stops its workers gracefully
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only our children
                self.proc.wait()
        self.log_file.close()


@contextmanager
def server(
    name: str, cmd: list[str], env: dict[str, str], port: int, logs: Path
) -> Iterator[Server]:
    s = Server(name, cmd, env, port, logs)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def service_cmd(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers)]  # fmt: skip


def uvicorn_cmd(target: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning"]  # fmt: skip


def drive(
    args: argparse.Namespace,
    port: int,
    traffic_path: Path,
    pids: dict[str, list[int]],
    *,
    candidates: int | None = None,
    rates: list[float] | None = None,
    start: float | None = None,
    duration: float | None = None,
    half: bool = False,
    metrics: bool = True,
    refine: int | None = None,
    max_rungs: int | None = None,
    warmup: float | None = None,
) -> dict[str, Any]:
    """One run of the load generator in its own process; its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [
        sys.executable, str(ROOT / "loadtest" / "gen.py"), "--port", str(port),
        "--traffic", str(traffic_path), "--candidates", str(candidates or args.candidates),
        "--k", str(args.k), "--duration", str(duration or args.duration),
        "--warmup", str(args.warmup if warmup is None else warmup),
        "--factor", str(args.factor),
        "--max-rungs", str(max_rungs or args.max_rungs),
        "--refine", str(args.refine if refine is None else refine),
        "--slo-ms", str(args.slo_ms), "--max-conns", str(args.max_conns),
        "--limit", str(args.n_requests), "--out", str(out), "--verbose",
    ]  # fmt: skip
    if rates:
        cmd += ["--rates", ",".join(f"{r:.3f}" for r in rates)]
    else:
        cmd += ["--start", str(start or args.start)]
    if half:
        cmd.append("--half")
    if metrics:
        cmd += ["--metrics-url", f"http://127.0.0.1:{port}/metrics"]
    for name, group in pids.items():
        cmd += ["--pids", name, ",".join(str(p) for p in group)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


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


def build_traffic(args: argparse.Namespace, manifest: Manifest, item_ids: list[str]) -> Path:
    source = args.traffic_source
    if source == "auto":
        source = "knn" if (args.data_dir / "ml100k").is_dir() else "random"
    if source == "knn":
        name = f"ml100k-knn-{args.max_candidates}-{args.n_requests}-s{args.seed}.json"
    else:
        name = (
            f"random-{manifest.version}-{args.max_candidates}-{args.n_requests}-s{args.seed}.json"
        )
    path = args.traffic_dir / name
    if path.exists():
        log(f"traffic: {path} (exists)")
        return path
    log(f"traffic: building {path} ({source})")
    if source == "knn":
        data = tf.build_knn(
            args.data_dir, args.max_candidates, manifest.history_len, args.n_requests,
            args.zipf_s, args.events_share, args.seed,
        )  # fmt: skip
    else:
        data = tf.build_random(
            item_ids, 943, args.max_candidates, manifest.history_len, args.n_requests,
            args.zipf_s, args.events_share, args.seed,
        )  # fmt: skip
    return tf.write(data, path)


def store_histories(url: str, prefix: str, users: dict[str, list[str]]) -> None:
    """Each user's history as the service keeps it: newest first (replaces what /events added)."""
    import redis

    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for user, history in users.items():
        key = f"{prefix}:h:{user}"
        pipe.delete(key)
        if history:
            pipe.lpush(key, *history)
    pipe.execute()
    client.close()


def redis_used_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    used = int(client.info("memory")["used_memory"])
    client.close()
    return used


def load_measured(url: str, folder: Path, prefix: str) -> dict[str, Any]:
    """Load a model version; Redis memory per item from INFO memory before and after."""
    before = redis_used_memory(url)
    start = time.perf_counter()
    manifest = load_model(url, folder, prefix)
    took = time.perf_counter() - start
    after = redis_used_memory(url)
    return {
        "version": manifest.version,
        "items": manifest.n_items,
        "vector_bytes": manifest.vector_bytes,
        "redis_used_memory_delta_mb": (after - before) / 1e6,
        "redis_bytes_per_item": (after - before) / manifest.n_items,
        "load_s": took,
    }


def synthetic_model(src: Path, root: Path, n_items: int, seed: int) -> Path:
    """The source model's ONNX graph with ``n_items`` random vectors, as its own version."""
    manifest = json.loads((src / "manifest.json").read_text())
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


def jobs_from_traffic(
    traffic: dict[str, Any], folder: Path, manifest: Manifest, n_cand: int, limit: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(history vectors, candidate vectors) of the traffic's /rerank requests."""
    vectors = np.load(folder / "item_vectors.npy").astype(np.float32)
    ids = (folder / "item_ids.txt").read_text().splitlines()
    row = {item: i for i, item in enumerate(ids)}
    jobs = []
    for req in traffic["requests"]:
        if req[0] != "r":
            continue
        hist = [row[i] for i in traffic["users"][req[1]][-manifest.history_len :] if i in row]
        cand = [row[i] for i in traffic["recall"][req[1]][:n_cand] if i in row]
        if cand:
            jobs.append((vectors[hist], vectors[cand]))
        if len(jobs) == limit:
            break
    return jobs


def floor_model(
    folder: Path,
    manifest: Manifest,
    traffic: dict[str, Any],
    n_cand: int,
    shares: dict[int, float],
    budget_s: float,
    rate: float,
) -> dict[str, Any]:
    """The ONNX session alone at the service's batch sizes: CPU and wall time per request.

    Two ways for each batch size: ``paced``, one batch every ``size / rate`` seconds, the
    spacing the service's batches had at ``rate`` req/s; and ``hot``, back to back. The
    paced one is the floor: on a core that does other work (or sleeps) between runs, a run
    costs two to three times its hot-loop CPU (what it left in the core's caches is gone by
    the next), and a service at ``rate`` cannot run hot. The hot figure is kept beside it as
    the lower bound.
    """
    from app.config import Settings
    from app.model import MIN_N_BUCKET, bucket, ladder, load_session

    # The service's own session settings (RERANK_ONNX_THREADS or its default), so the floor
    # is the same session the service runs, not a cheaper or dearer one.
    threads = Settings().onnx_threads
    session = load_session(folder / "model.onnx", ["CPUExecutionProvider"], threads)
    has_rank = "cand_rank" in {i.name for i in session.get_inputs()}
    l_buckets = ladder(manifest.history_len)
    n_buckets = ladder(max(1000, MIN_N_BUCKET), MIN_N_BUCKET)
    jobs = jobs_from_traffic(traffic, folder, manifest, n_cand, 512)
    d = manifest.dim
    per_size: dict[int, dict[str, Any]] = {}
    for size, share in shares.items():
        feeds = []
        for start in range(0, min(len(jobs), 8 * size), size):  # up to 8 distinct batches
            group = jobs[start : start + size]
            if len(group) < size:
                break
            l_pad = bucket(max(max(len(h) for h, _ in group), 1), l_buckets)
            n_pad = bucket(max(len(c) for _, c in group), n_buckets)
            feed = {
                "hist": np.zeros((size, l_pad, d), np.float32),
                "hist_mask": np.zeros((size, l_pad), np.bool_),
                "cand": np.zeros((size, n_pad, d), np.float32),
                "cand_mask": np.zeros((size, n_pad), np.bool_),
            }
            if has_rank:
                feed["cand_rank"] = np.tile(np.arange(n_pad, dtype=np.float32), (size, 1))
            for r, (h, c) in enumerate(group):
                if len(h):
                    feed["hist"][r, l_pad - len(h) :] = h
                    feed["hist_mask"][r, l_pad - len(h) :] = True
                feed["cand"][r, : len(c)] = c
                feed["cand_mask"][r, : len(c)] = True
            feeds.append(feed)
        if not feeds:
            continue
        for feed in feeds:  # first runs allocate
            session.run(["scores", "attn"], feed)
        slice_s = budget_s * max(share, 0.1) / 2
        hot = _model_runs(session, feeds, slice_s, interval_s=0.0)
        paced = _model_runs(session, feeds, slice_s, interval_s=size / rate)
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
        "onnx_threads": threads,
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
    session: Any, feeds: list[dict[str, np.ndarray]], slice_s: float, interval_s: float
) -> dict[str, float]:
    """Run the feeds in turn, one every ``interval_s`` (0: back to back); per-run CPU, wall."""
    runs, cpu, wall = 0, 0.0, 0.0
    start = time.perf_counter()
    while runs < 5 or time.perf_counter() - start < slice_s:
        due = start + runs * interval_s
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        c0, w0 = time.process_time(), time.perf_counter()  # intra-op threads included
        session.run(["scores", "attn"], feeds[runs % len(feeds)])
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        runs += 1
    return {"runs": runs, "cpu_ms": 1000 * cpu / runs, "wall_ms": 1000 * wall / runs}


async def _redis_reads(
    url: str,
    prefix: str,
    manifest: Manifest,
    traffic: dict[str, Any],
    n_cand: int,
    with_candidates: bool,
    budget_s: float,
    concurrency: int,
    redis_pid: int,
    interval_s: float = 0.0,
) -> dict[str, Any]:
    """The reads, ``concurrency`` at a time back to back, or (``interval_s`` > 0) one at a
    time, one every ``interval_s``: then CPU counts from each call to its answer only, so the
    pacing's own timer wake-ups are left out."""
    from redis.asyncio import Redis

    from app.store import FETCH_SCRIPT, Keys

    keys = Keys(prefix)
    client = Redis.from_url(url, max_connections=concurrency * 2)
    script = client.register_script(FETCH_SCRIPT)
    await client.script_load(FETCH_SCRIPT)
    requests = traffic["requests"]
    vector_prefix = keys.vector_prefix(manifest.version)
    counter = iter(range(10**9))
    latencies: list[float] = []
    paced_cpu: list[float] = []
    stop_at = 0.0

    async def one(req: list[Any]) -> None:
        if req[0] == "e":  # what the service sends for /events
            pipe = client.pipeline(transaction=True)
            pipe.lpush(keys.history(req[1]), *req[2])
            pipe.ltrim(keys.history(req[1]), 0, manifest.history_len - 1)
            pipe.llen(keys.history(req[1]))
            await pipe.execute()
            return
        cands = traffic["recall"][req[1]][:n_cand] if with_candidates else []
        await script(
            keys=[keys.history(req[1])], args=[vector_prefix, manifest.history_len, *cands]
        )

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            req = requests[next(counter) % len(requests)]
            t = time.perf_counter()
            await one(req)
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

    for req in requests[:50]:  # connections and script cache warm
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
    """Redis alone: the service's reads with redis-py's asyncio client (hiredis), on uvloop.

    ``warm``: what a service with every vector cached sends (the stored history and its
    vectors in one script call); ``cold``: the same call with every candidate too. The floor
    mixes them at the service's own cache miss share, measured in the same rung. Like the
    model's, the floor is paced (one read every ``1 / rate`` seconds, as the service sent
    them); ``hot``, ``concurrency`` reads at a time back to back, is kept as the lower bound.
    """
    import uvloop

    def read(with_cands: bool, concurrency: int, interval_s: float) -> dict[str, Any]:
        return uvloop.run(
            _redis_reads(url, prefix, manifest, traffic, n_cand, with_cands, budget_s / 4,
                         concurrency, redis_pid, interval_s)
        )  # fmt: skip

    def mix(warm: dict[str, Any], cold: dict[str, Any]) -> float:
        w, c = warm["cpu_ms_per_request"], cold["cpu_ms_per_request"]
        return float(w + miss_share * (c - w))

    paced = {"warm": read(False, 1, 1 / rate), "cold": read(True, 1, 1 / rate)}
    hot = {"warm": read(False, concurrency, 0.0), "cold": read(True, concurrency, 0.0)}
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
    lines += [
        "## Cost per request against the number of candidates",
        "",
        f"At {res['params']['sweep_rate']:g} req/s offered.",
        "",
        "| candidates | server CPU ms/req | p50 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|",
    ]
    for r in res["scaling"]["candidates"]:
        cpu = server_cpu(r)
        lines.append(
            f"| {r['candidates']} | {fmt(cpu, 3)} | {fmt(r['latency_ms']['p50'], 2)} | "
            f"{fmt(r['latency_ms']['p99'], 2)} | {fmt(r.get('mean_batch'))} |"
        )
    lines += [
        "",
        "## Cost per request against the catalogue size",
        "",
        "| catalogue | Redis bytes/item | server CPU ms/req | p50 ms | p99 ms | cache miss "
        "share | worker RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in res["scaling"]["catalogue"]:
        r = c["rung"]
        cpu = server_cpu(r)
        lines.append(
            f"| {c['items']} | {fmt(c['redis_bytes_per_item'])} | {fmt(cpu, 3)} | "
            f"{fmt(r['latency_ms']['p50'], 2)} | {fmt(r['latency_ms']['p99'], 2)} | "
            f"{fmt(r.get('cache_miss_share'), 3)} | {fmt(c['worker_rss_mb'][0])} |"
        )
    lines += ["", "## --workers", "",
              "| workers | max req/s with p99 <= SLO | max req/s sustained | worker RSS MB |",
              "|---|---|---|---|"]  # fmt: skip
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
    shown = traffic_path.relative_to(ROOT) if traffic_path.is_relative_to(ROOT) else traffic_path
    meta_traffic = {
        **traffic["meta"],
        "file": str(shown),
        "candidates_with_vector_share": sum(i in known for i in cands) / max(1, len(cands)),
    }
    work = Path(tempfile.mkdtemp(prefix="rerank-bench-"))
    logs = work / "logs"
    logs.mkdir()
    results: dict[str, Any] = {}
    prefix = "rr"
    try:
        with EmbeddedRedis() as redis_server:
            url = redis_server.url
            log(f"redis-server {url}; loading {folder.name}")
            real_load = load_measured(url, folder, prefix)
            store_histories(url, prefix, traffic["users"])
            base_env = {
                **os.environ,
                "RERANK_REDIS_URL": url,
                "RERANK_MODEL_DIR": str(folder.parent),
                "RERANK_KEY_PREFIX": prefix,
            }
            redis_pid = redis_server.pid
            workers_results: list[dict[str, Any]] = []

            # -- the service, --workers 1: ladder, then the candidates sweep
            port = free_port()
            with server("service-w1", service_cmd(port, 1), base_env, port, logs) as svc:
                pids = {"service": [svc.proc.pid], "redis": [redis_pid]}
                log("service --workers 1: ladder")
                service = drive(args, port, traffic_path, pids, half=True)
                rss_w1 = svc.rss_mb()
                log("service: cost against the number of candidates")
                sweep = []
                for n in args.sweep_candidates:
                    store_histories(url, prefix, traffic["users"])
                    r = drive(args, port, traffic_path, pids, candidates=n, rates=[args.sweep_rate],
                              duration=args.sweep_duration, refine=0, warmup=1.0)  # fmt: skip
                    sweep.append({"candidates": n, **rung_summary(r["rungs"][0])})
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
            store_histories(url, prefix, traffic["users"])
            f_redis = floor_redis(
                url, prefix, manifest, traffic, args.candidates,
                half_s.get("cache_miss_share") or 0.0, args.floor_budget,
                args.redis_concurrency, redis_pid, half_rate,
            )  # fmt: skip
            store_histories(url, prefix, traffic["users"])
            log(f"floor 3: HTTP alone at {half_rate:.1f} req/s")
            port = free_port()
            with server("http-floor", uvicorn_cmd("loadtest.peers.nothing:app", port),
                        base_env, port, logs) as floor:  # fmt: skip
                http = drive(args, port, traffic_path, {"http": [floor.proc.pid]},
                             rates=[half_rate], refine=0, metrics=False,
                             duration=HALF_RUNG_FACTOR * args.duration)  # fmt: skip
            f_http = rung_summary(http["rungs"][0])
            f_http["cpu_ms_per_request"] = f_http["cpu_ms_per_request"]["http"]

            # -- the naive peer
            log("naive peer: ladder")
            store_histories(url, prefix, traffic["users"])
            peer_env = {**base_env, "NAIVE_REDIS_URL": url, "NAIVE_MODEL": str(folder),
                        "NAIVE_PREFIX": prefix}  # fmt: skip
            port = free_port()
            with server("naive-peer", uvicorn_cmd("loadtest.peers.naive:app", port),
                        peer_env, port, logs) as peer_srv:  # fmt: skip
                peer = drive(args, port, traffic_path, {"peer": [peer_srv.proc.pid]},
                             start=args.peer_start, metrics=False)  # fmt: skip

            # -- more workers
            for w in args.workers:
                if w == 1:
                    continue
                log(f"service --workers {w}: ladder")
                store_histories(url, prefix, traffic["users"])
                port = free_port()
                with server(f"service-w{w}", service_cmd(port, w), base_env, port, logs) as svc:
                    lad = drive(args, port, traffic_path, {"service": [svc.proc.pid]},
                                metrics=False)  # fmt: skip
                    workers_results.append({"workers": w, "ladder": ladder_summary(lad),
                                            "worker_rss_mb": svc.rss_mb()})  # fmt: skip

            # -- catalogue size
            store_histories(url, prefix, traffic["users"])
            real_rung = next((s for s in sweep if s["candidates"] == args.candidates), None)
            catalogue = [{**real_load, "worker_rss_mb": rss_w1, "rung": real_rung}]
            if args.catalogue > 0:
                catalogue.append(
                    synthetic_catalogue(args, folder, manifest, url, redis_pid, work, logs)
                )
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
        results = {
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
                "model_dir": str(folder),
                "traffic": meta_traffic,
                "command": " ".join(["python", "loadtest/bench.py", *args.argv]),
                "wall_s": None,
            },
            "params": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k != "argv"
            },  # fmt: skip
            "service": ladder_summary(service),
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
        over = results["floors"]["service_over_floors"]
        over_hot = results["floors"]["service_over_hot_floors"]
        results["standards"] = {
            "throughput_vs_peer": check(
                "max req/s with p99 <= 50 ms, service / naive peer", ratio, ">= 3",
                svc_max > 0 and (ratio is None or ratio >= 3), peer_note,
            ),
            "efficiency": check(
                "service CPU per request / sum of the floors' (paced at the same rate)", over,
                "<= 1.5", over is not None and over <= 1.5,
                f"against the hot-loop floors: {fmt(over_hot, 2)}",
            ),
            "p99_at_half": check(
                f"p99 ms at half the max throughput ({half_rate:.0f} req/s offered)",
                half_s["latency_ms"]["p99"], "<= 15", (half_s["latency_ms"]["p99"] or 1e9) <= 15,
            ),
            "worker_rss": check(
                "resident MB of one worker" + (", 100k-entry cache full" if args.catalogue else ""),
                rss_check, "<= 400", rss_check <= 400,
            ),
        }  # fmt: skip
        results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    except BaseException:
        log(f"failed; server logs kept in {logs}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{args.machine}"
    out = args.out_dir / f"{stem}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(results))
    plot(results, args.out_dir / f"{stem}.png")
    log(f"wrote {out} (+ .md, .png) in {results['meta']['wall_s']:.0f}s")
    return out


def synthetic_catalogue(
    args: argparse.Namespace, src: Path, manifest: Manifest, url: str, redis_pid: int,
    work: Path, logs: Path,
) -> dict[str, Any]:  # fmt: skip
    """A catalogue of ``args.catalogue`` random vectors under its own version and key prefix,
    served by its own service; the cache filled to its size first, then one rung."""
    log(f"catalogue of {args.catalogue} items: vectors, Redis load")
    root = work / "models-synthetic"
    folder = synthetic_model(src, root, args.catalogue, args.seed)
    prefix = "rrsyn"
    loaded = load_measured(url, folder, prefix)
    ids = [str(i) for i in range(1, args.catalogue + 1)]
    syn = tf.build_random(
        ids, args.catalogue_users, args.candidates, manifest.history_len,
        min(args.n_requests, 5000), args.zipf_s, args.events_share, args.seed,
    )  # fmt: skip
    syn_path = tf.write(syn, work / "traffic-synthetic.json")
    store_histories(url, prefix, syn["users"])
    # Fill the cache: requests of distinct items until it holds cache_size entries.
    fill_n = args.cache_fill
    fill = {
        "meta": {"source": "cache fill: disjoint blocks of items"},
        "users": {},
        "recall": {
            f"f{i}": ids[(i * 100) % len(ids) : (i * 100) % len(ids) + 100] for i in range(fill_n)
        },  # fmt: skip
        "requests": [["r", f"f{i}"] for i in range(fill_n)],
    }
    fill_path = tf.write(fill, work / "traffic-fill.json")
    env = {**os.environ, "RERANK_REDIS_URL": url, "RERANK_MODEL_DIR": str(root),
           "RERANK_KEY_PREFIX": prefix}  # fmt: skip
    port = free_port()
    with server("service-synthetic", service_cmd(port, 1), env, port, logs) as svc:
        drive(args, port, fill_path, {"service": [svc.proc.pid]}, candidates=100,
              rates=[args.fill_rate], duration=max(0.5, fill_n / args.fill_rate), refine=0,
              warmup=0.0)  # fmt: skip
        log("catalogue: one rung")
        r = drive(args, port, syn_path, {"service": [svc.proc.pid], "redis": [redis_pid]},
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
        if args.traffic_source == "auto":
            args.traffic_source = "random"
    if args.candidates > args.max_candidates:
        p.error(f"--candidates={args.candidates} exceeds --max-candidates={args.max_candidates}")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
