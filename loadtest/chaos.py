"""`make chaos`: Redis and model faults, SIGTERM and overload, each under steady load.

    python -m loadtest.chaos          # writes loadtest/results/chaos-<date>.json

The service runs as its own process (``loadtest.harness``) against a redis-server of the
harness; the load is ``loadtest.load``'s open-loop generator at a steady rate. Each scenario
reports the requests sent, normal 200s, degraded 200s, 503 sheds, refused connections, other
errors (the guarantee: 0), the worst latency during the fault and the time to full recovery
(from the end of the fault to the last answer that was not normal). Overload runs twice:
open loop at a multiple of the measured capacity, and closed loop (many callers that ignore
``Retry-After``). tests/test_chaos.py runs the same scenarios with short parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import uvloop

from app.embedded import free_port
from loadtest import load
from loadtest.harness import Harness, Server, harness, metric_total, read_metrics, service_cmd

# --- Parameters -------------------------------------------------------------------------
STEADY_RATE = 200.0  # requests per second of the steady load
CONNECTIONS = 64  # most connections of the steady load
BEFORE_S = 1.0  # load before each fault
FAULT_S = 2.0  # length of each fault (SIGSTOP, CLIENT PAUSE, Redis down)
AFTER_S = 3.0  # load after each fault, for the recovery
CANDIDATES = 100  # candidates per request
BODIES = 400  # distinct request bodies of the steady load, cycled
OVERLOAD_S = 30.0  # the open-loop overload run
# The unloaded p99 before it, at 20 req/s over as long as the overload: fewer answers make
# the p99 one of the slowest few, which one stall of a shared machine decides.
UNLOADED_S = 30.0
UNLOADED_RPS = 20.0
OVERLOAD_FACTOR = 3.0  # offered load as a multiple of the measured capacity
CAPACITY_S = 3.0  # seconds per rung of the capacity ladder (open loop, as the bench's)
# The open-loop generator's most connections. A refused request holds its connection until
# its 503 (RERANK_QUEUE_TIMEOUT_MS, 200 ms), so three times a capacity of 600 req/s keeps
# about 360 open at once; past this many, requests would wait in the generator instead.
OVERLOAD_CONNECTIONS = 1024
OVERLOAD_PAYLOADS = 2000  # distinct requests, cycled
CLOSED_CONNECTIONS = 256  # callers of the closed-loop overload
CLOSED_S = 10.0  # its length
SHUTDOWN_DELAY_S = 1.0  # RERANK_SHUTDOWN_DELAY_S of the service under test
DRAIN_S = 5.0  # RERANK_DRAIN_S
N_ITEMS = 1000  # items of the random models exported for the run
SERVICE_ENV: dict[str, str] = {}  # more RERANK_* settings for the service
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Report:
    scenario: str
    sent: int = 0
    normal: int = 0
    degraded: int = 0
    shed: int = 0
    refused: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    worst_fault_ms: float = 0.0
    recovery_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def report(name: str, run: load.Run, fault: tuple[float, float] | None = None) -> Report:
    """A run's answers by kind; with a fault window (perf_counter times), the worst latency
    of the answers it overlapped and the time from its end to the last answer not normal."""
    ok, status = run.ok, run.status
    normal = ok & ~run.degraded
    other = ~ok & (status != load.SHED) & (status != load.REFUSED)
    r = Report(
        name,
        sent=len(status),
        normal=int(normal.sum()),
        degraded=int((ok & run.degraded).sum()),
        shed=int((status == load.SHED).sum()),
        refused=int((status == load.REFUSED).sum()),
        errors=int(other.sum()),
        error_samples=[f"status {s}" for s in status[other][:5].tolist()],
    )
    never_written = int(((status == load.TIMEOUT) & (run.sent == 0)).sum())
    if never_written:  # errors of the generator's own queue: no connection came free in time
        r.extra["unanswered_never_written"] = never_written
    if fault is not None:
        start, end = fault
        during = (run.done >= start) & (run.due <= end)
        r.worst_fault_ms = round(float(run.latency()[during].max(initial=0.0)) * 1000, 1)
        last_bad = run.done[~normal & (run.done >= start)].max(initial=0.0)
        r.recovery_s = round(max(0.0, last_bad - end), 3) if last_bad else 0.0
        if not (normal & (run.due > end)).any():
            r.recovery_s = None  # never recovered within the run
    return r


def request_bodies(ids: list[str], n: int, seed: int = 0) -> list[bytes]:
    """``n`` /rerank bodies: CANDIDATES random items plus one that no cache knows."""
    rng = random.Random(seed)
    rendered = []
    for _ in range(n):
        cands = rng.sample(ids, min(CANDIDATES, len(ids))) + ["no-such-item"]
        user = f"u{rng.randint(1, 50)}"
        rendered.append(json.dumps({"user_id": user, "candidates": cands, "k": 10}).encode())
    return rendered


# --- The service under test --------------------------------------------------------------


@dataclass
class Target:
    """The harness, its model folder (versions a, b, c), the service and its settings."""

    harness: Harness
    models: Path
    env: dict[str, str]
    service: Server
    ids: list[str]  # every item but the last, which no cache sees: bad_swap corrupts it
    unseen: str

    @property
    def port(self) -> int:
        return self.service.port

    def payloads(self, n: int, seed: int = 0) -> list[bytes]:
        """Whole requests, head and body, rendered before any of them is sent."""
        bodies = request_bodies(self.ids, n, seed)
        return [load.render(self.port, "POST", "/rerank", body) for body in bodies]

    def active(self) -> str:
        with self.harness.client() as r:
            return (r.get(f"{self.harness.prefix}:active") or b"").decode()


@contextlib.contextmanager
def environment(env: dict[str, str] | None = None) -> Iterator[Target]:
    from training.export import export_random_model  # torch: only to make the models

    with harness(name="rerank-chaos") as h:
        models = h.work / "models"
        for seed, version in enumerate(("chaos-a", "chaos-b", "chaos-c")):
            export_random_model(models, N_ITEMS, dim=32, history_len=20, version=version,
                                seed=seed)  # fmt: skip
        (models / "DEFAULT").write_text("chaos-a\n")
        h.load(models / "chaos-a")
        settings = h.env(
            models,
            RERANK_VERSION_POLL_S="0.2",
            RERANK_SHUTDOWN_DELAY_S=str(SHUTDOWN_DELAY_S),
            RERANK_DRAIN_S=str(DRAIN_S),
            RERANK_LOG_LEVEL="WARNING",
            **SERVICE_ENV,
            **(env or {}),
        )
        port = free_port()
        service = h.start("service", service_cmd(port), settings, port)
        ids = [str(i) for i in range(1, N_ITEMS)]
        yield Target(h, models, settings, service, ids, str(N_ITEMS))


@dataclass
class Steady:
    """The steady load of a scenario: stop it, hold it, read its run once it has stopped."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    hold: asyncio.Event = field(default_factory=asyncio.Event)  # set: a balancer sends nothing
    run: load.Run | None = None


@contextlib.asynccontextmanager
async def steady(target: Target, rate: float | None = None) -> AsyncIterator[Steady]:
    s = Steady()
    task = asyncio.create_task(
        load.open_loop(target.port, target.payloads(BODIES), rate or STEADY_RATE, stop=s.stop,
                       hold=s.hold, max_conns=CONNECTIONS)
    )  # fmt: skip
    try:
        yield s
    finally:
        s.stop.set()
        s.run = await task


async def swap_failures(target: Target) -> float:
    return metric_total(await read_metrics(target.port), "rerank_model_swap_failures_total")


# --- Scenarios ----------------------------------------------------------------------------


async def redis_fault(target: Target, name: str, fault_s: float = FAULT_S) -> Report:
    """killed (SIGKILL, restart empty, reload), paused (SIGSTOP) or slowed (CLIENT PAUSE)."""
    server = target.harness.redis
    async with steady(target) as s:
        await asyncio.sleep(BEFORE_S)
        start = time.perf_counter()
        if name == "redis_killed":
            process = server.process
            assert process is not None
            process.kill()
            process.wait()
            server.process = None
            await asyncio.sleep(fault_s)
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(target.harness.load, target.models / "chaos-a")
        elif name == "redis_paused":
            os.kill(server.pid, signal.SIGSTOP)
            await asyncio.sleep(fault_s)
            os.kill(server.pid, signal.SIGCONT)
        elif name == "redis_slowed":
            with target.harness.client() as r:
                r.execute_command("CLIENT", "PAUSE", int(fault_s * 1000), "ALL")
            await asyncio.sleep(fault_s)
        end = time.perf_counter()
        await asyncio.sleep(AFTER_S)
    assert s.run is not None
    return report(name, s.run, (start, end))


async def redis_full(target: Target) -> Report:
    """maxmemory reached while `rerank load` writes a new version: it fails, a stays active."""
    prefix = target.harness.prefix
    async with steady(target) as s:
        await asyncio.sleep(BEFORE_S)
        start = time.perf_counter()
        with target.harness.client() as r:
            used = int(r.info("memory")["used_memory"])
            r.config_set("maxmemory-policy", "noeviction")
            # Room for a few dozen vectors only, whatever the Redis version's per-key
            # overhead: the new version can never fit, so the load must fail part-way.
            r.config_set("maxmemory", used + 4 * 1024)
        try:
            cli = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "app.cli", "load", str(target.models / "chaos-b")],
                env=target.env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        finally:
            with target.harness.client() as r:
                r.config_set("maxmemory", 0)
                partial = len(r.keys(f"{prefix}:v:chaos-b:*"))
        end = time.perf_counter()
        await asyncio.sleep(AFTER_S)
    assert s.run is not None
    result = report("redis_full", s.run, (start, end))
    result.extra = {
        "load_exit_code": cli.returncode,
        "load_message": cli.stderr.strip().splitlines()[-1] if cli.stderr.strip() else "",
        "active_after": target.active(),
        "partial_vectors_left": partial,
    }
    return result


async def bad_swap(target: Target) -> Report:
    """Version b with a corrupt model.onnx, c without one, and a corrupt vector of a."""
    h, models = target.harness, target.models
    failures_before = await swap_failures(target)
    async with steady(target) as s:
        await asyncio.sleep(BEFORE_S)
        start = time.perf_counter()
        # The loader reads an intact copy (the build machine); the service's copy is broken.
        source = h.work / "source"
        for version in ("chaos-b", "chaos-c"):
            shutil.copytree(models / version, source / version)
        onnx = models / "chaos-b" / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[: len(onnx.read_bytes()) // 2])
        await asyncio.to_thread(h.load, source / "chaos-b")
        await asyncio.sleep(1.0)
        (models / "chaos-c" / "model.onnx").unlink()
        await asyncio.to_thread(h.load, source / "chaos-c")
        await asyncio.sleep(1.0)
        with h.client() as r:  # a vector of the serving version cut short
            r.set(f"{h.prefix}:v:chaos-a:{target.unseen}", b"\x00\x01\x02")
            r.set(f"{h.prefix}:active", "chaos-a")
        body = json.dumps({"user_id": "x", "candidates": [target.unseen, "1"]}).encode()
        # A shed (503) is retried, as a caller would; so is a degraded 200 (Redis past its
        # deadline on a busy machine), which says nothing about the corrupt vector.
        for _ in range(50):
            status, data = await load.request(target.port, "POST", "/rerank", body)
            if status == 200 and not json.loads(data)["degraded"]:
                break
            await asyncio.sleep(0.05)
        end = time.perf_counter()
        await asyncio.sleep(AFTER_S)
    assert s.run is not None
    _, ready = await load.request(target.port, "GET", "/readyz")
    result = report("bad_model_or_vector_at_swap", s.run, (start, end))
    result.extra = {
        "swap_failures": await swap_failures(target) - failures_before,
        "served_version": str(json.loads(ready)["model_version"]),
        "corrupt_vector_is_missing": json.loads(data)["missing"] == [target.unseen],
    }
    return result


async def sigterm(target: Target) -> Report:
    """SIGTERM under load: readiness false first, in-flight answered, exit within the drain."""
    process = target.service.proc
    not_ready_at: float | None = None
    signalled: float | None = None

    async def probe(s: Steady) -> None:  # the balancer: stops sending once /readyz says no
        nonlocal not_ready_at
        while not s.stop.is_set():
            try:
                status = (await load.request(target.port, "GET", "/readyz"))[0]
            except OSError:
                status = 0
            if status != 200 and not_ready_at is None and signalled is not None:
                not_ready_at = time.perf_counter()
                s.hold.set()
            await asyncio.sleep(0.05)

    async with steady(target) as s:
        prober = asyncio.create_task(probe(s))
        await asyncio.sleep(BEFORE_S)
        signalled = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, SHUTDOWN_DELAY_S + DRAIN_S + 30)
        exited = time.perf_counter()
        s.stop.set()
        await prober
    assert s.run is not None
    result = report("sigterm", s.run, (signalled, exited))
    result.recovery_s = None
    run = s.run
    result.extra = {
        "readiness_false_after_s": round(not_ready_at - signalled, 3) if not_ready_at else None,
        "exit_after_s": round(exited - signalled, 3),
        "exit_bound_s": SHUTDOWN_DELAY_S + DRAIN_S,
        "exit_code": code,
        "answered_after_signal": int(((run.due >= signalled) & run.ok & ~run.degraded).sum()),
    }
    return result


def _ms(seconds: np.ndarray, q: float) -> float | None:
    value = load.pct(seconds, q)
    return None if value is None else round(value, 2)


async def capacity(port: int, payloads: list[bytes], seconds: float) -> float:
    """The bench's measure: the most req/s answered with p99 <= 50 ms and <= 1% not normal,
    found by the open-loop ladder (rungs x1.3, two bisections at the edge)."""

    async def rung(rate: float) -> dict[str, Any]:
        run = await load.open_loop(port, payloads, rate, seconds,
                                   max_conns=OVERLOAD_CONNECTIONS)  # fmt: skip
        await asyncio.sleep(0.3)
        return run.summary(rate)

    await load.open_loop(port, payloads, 100.0, 1.0)  # warm-up, unreported
    result = await load.ladder(rung, start=100.0, factor=1.3, max_rungs=12, refine=2)
    # No rung within the objective (a machine busy with something else): the most it
    # answered at any latency, so that the overload still offers a multiple of something.
    fallback = max(r["achieved_rps"] for r in result["rungs"])
    return float(result["max_rps_within_slo"] or fallback)


async def overload(
    target: Target, seconds: float = OVERLOAD_S, factor: float = OVERLOAD_FACTOR
) -> Report:
    """Unloaded p99, capacity, then ``factor`` x capacity offered for ``seconds``, open loop;
    then a steady 20 req/s, which must be served normally."""
    service = psutil.Process(target.service.pid)
    payloads = target.payloads(OVERLOAD_PAYLOADS)
    quiet = await load.open_loop(target.port, payloads, UNLOADED_RPS, min(UNLOADED_S, seconds))
    cap = await capacity(target.port, payloads, min(CAPACITY_S, seconds))
    rss_before = rss_peak = service.memory_info().rss
    rate = cap * factor

    async def watch_memory() -> None:
        nonlocal rss_peak
        while True:
            await asyncio.sleep(0.5)
            rss_peak = max(rss_peak, service.memory_info().rss)

    watcher = asyncio.create_task(watch_memory())
    try:
        heavy = await load.open_loop(target.port, payloads, rate, seconds,
                                     max_conns=OVERLOAD_CONNECTIONS)  # fmt: skip
    finally:
        watcher.cancel()
    async with steady(target, rate=20.0) as after:
        await asyncio.sleep(2.0)
    assert after.run is not None
    result = report("overload", heavy)
    result.worst_fault_ms = round(float(heavy.latency().max()) * 1000, 1)
    accepted = heavy.latency()[heavy.ok]
    result.extra = {
        "capacity_rps": round(cap, 1),
        "target_rps": round(rate, 1),
        "unloaded_p99_ms": _ms(quiet.latency()[quiet.ok], 99),
        "unloaded_p99_since_sent_ms": _ms(quiet.latency(since_sent=True)[quiet.ok], 99),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(rss_peak / 2**20, 1),
        "after_normal": int((after.run.ok & ~after.run.degraded).sum()),
        "after_sent": len(after.run.status),
        "offered_rps": round(len(heavy.status) / seconds, 1),
        "accepted_rps": round(len(accepted) / seconds, 1),
        "accepted_p99_ms": _ms(accepted, 99),
        "accepted_p50_ms": _ms(accepted, 50),
        "accepted_p99_since_sent_ms": _ms(heavy.latency(since_sent=True)[heavy.ok], 99),
        "generator_send_lag_p99_ms": _ms(heavy.lag, 99),
    }
    return result


async def overload_closed_loop(
    target: Target, seconds: float = CLOSED_S, connections: int = CLOSED_CONNECTIONS
) -> Report:
    """``connections`` callers that send again as soon as they are answered, Retry-After
    ignored: goodput (200s per second) and the latency of the 200s from when each was sent."""
    run = await load.closed_loop(target.port, target.payloads(OVERLOAD_PAYLOADS), connections,
                                 seconds)  # fmt: skip
    result = report("overload_closed_loop", run)
    since_sent = run.latency(since_sent=True)
    result.worst_fault_ms = round(float(since_sent.max(initial=0.0)) * 1000, 1)
    result.extra = {
        "connections": connections,
        "seconds": seconds,
        "goodput_rps": round(int(run.ok.sum()) / seconds, 1),
        "answers_rps": round(len(run.status) / seconds, 1),
        "accepted_p99_ms": _ms(since_sent[run.ok], 99),
        "accepted_p50_ms": _ms(since_sent[run.ok], 50),
        "generator_cpu_cores": round(run.cpu_s / seconds, 2),
    }
    return result


async def run_all(target: Target) -> list[Report]:
    reports: list[Report] = []
    for name in ("redis_paused", "redis_slowed", "redis_killed"):
        reports.append(await redis_fault(target, name))
    reports.append(await redis_full(target))
    reports.append(await bad_swap(target))
    reports.append(await overload(target))
    reports.append(await overload_closed_loop(target))
    reports.append(await sigterm(target))
    return reports


def main() -> int:
    started = dt.datetime.now(dt.UTC)
    # uvloop: the generator shares the service's cores, and on uvloop it costs less and lags
    # less, so less of what it measures is its own.
    # The environment starts outside the event loop: its readiness wait runs a loop of its own.
    with environment() as target:
        reports = uvloop.run(run_all(target))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"chaos-{started:%Y-%m-%d}.json"
    params = {
        k: v for k, v in globals().items() if k.isupper() and isinstance(v, int | float | dict)
    }
    document = {
        "started": started.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count()},
        "parameters": params,
        "scenarios": [asdict(r) for r in reports],
    }
    out.write_text(json.dumps(document, indent=2) + "\n")
    for r in reports:
        print(
            f"{r.scenario:30} sent={r.sent:6} normal={r.normal:6} degraded={r.degraded:5} "
            f"shed={r.shed:6} refused={r.refused:4} errors={r.errors} "
            f"worst={r.worst_fault_ms}ms recovery={r.recovery_s}s {r.extra}"
        )
    print(f"wrote {out}")
    return 1 if any(r.errors for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
