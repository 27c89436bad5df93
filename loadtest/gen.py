"""Open-loop, constant-rate HTTP/1.1 load generator with its own cost on the record.

Request ``i`` of a rung is due at ``T0 + i / rate`` and is written at that time whether or
not earlier requests have answered: when every connection is busy another one is opened (up
to ``--max-conns``), beyond that the request waits in a backlog, and its latency still counts
from the time it was due, so queueing anywhere shows up in the percentiles (no coordinated
omission).

Why it is not the bottleneck, and how that is shown: request bytes are rendered before the
rung starts, the client is a bare ``asyncio.Protocol`` on uvloop (no HTTP library, no task
per request: one ``write`` out, a ``find`` for the end of the headers in), and every rung
reports the generator's own CPU time and its send lag (how late the scheduler wrote each
request against its due time). A rung whose lag p99 stays at the timer resolution (~1 ms)
and whose CPU stays well under one core was limited by the server, not by this process.

Run by ``bench.py`` in its own process; results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, the repository root is not on the path
    sys.path.insert(0, str(ROOT))

from loadtest import traffic as traffic_file  # noqa: E402

perf = time.perf_counter

# Status codes as the results count them.
SHED = 503
CONNECT_ERROR = -1
TIMEOUT = -2
BAD_RESPONSE = -3

# The half rung is the one the standards read (its p99, the CPU per request): three times the
# samples of a ladder rung, so that its p99 is not the ninth-slowest of 900 answers, which one
# stall of the shared machine decides (15.0 ms in a run whose neighbouring rungs had 9.7).
HALF_RUNG_FACTOR = 3


class Recorder:
    """Per-request stamps of one rung, in numpy arrays indexed by request number."""

    def __init__(self, n: int) -> None:
        self.due = np.zeros(n)
        self.sent = np.zeros(n)
        self.done = np.full(n, np.nan)
        self.status = np.zeros(n, np.int32)
        self.degraded = np.zeros(n, np.bool_)
        self.open = 0

    def finish(self, i: int, status: int, degraded: bool = False) -> None:
        if not np.isnan(self.done[i]):
            return
        self.done[i] = perf()
        self.status[i] = status
        self.degraded[i] = degraded
        self.open -= 1


class Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.current = -1
        self.need = -1
        self.body_at = 0
        self.status = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, i: int, payload: bytes) -> None:
        self.current = i
        self.pool.rec.sent[i] = perf()
        assert self.transport is not None
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0 or not head.startswith(b"http/1.1 "):
                self._fail(BAD_RESPONSE)
                return
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else None])
            self.status = int(head[9:12])
            if self.status == SHED and b"\r\nretry-after:" not in head:
                self.status = BAD_RESPONSE  # a shed the caller cannot schedule a retry from
            self.body_at = end + 4
            self.need = self.body_at + length
        if len(self.buf) < self.need:
            return
        degraded = self.buf.find(b'"degraded":true', self.body_at, self.need) >= 0
        del self.buf[: self.need]
        self.need = -1
        i, self.current = self.current, -1
        if i >= 0:
            self.pool.rec.finish(i, self.status, degraded)
        self.pool.idle_or_next(self)

    def _fail(self, status: int) -> None:
        if self.current >= 0:
            self.pool.rec.finish(self.current, status)
            self.current = -1
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if self.current >= 0:
            self.pool.rec.finish(self.current, CONNECT_ERROR)
            self.current = -1
        self.pool.lost(self)


class Pool:
    def __init__(self, host: str, port: int, max_conns: int) -> None:
        self.host = host
        self.port = port
        self.max_conns = max_conns
        self.idle: deque[Conn] = deque()
        self.conns: set[Conn] = set()
        self.connecting = 0
        self.backlog: deque[tuple[int, bytes]] = deque()
        self.rec = Recorder(0)
        self.peak_conns = 0

    def dispatch(self, i: int, payload: bytes) -> None:
        self.rec.open += 1
        if self.idle:
            self.idle.popleft().send(i, payload)
            return
        self.backlog.append((i, payload))
        if len(self.conns) + self.connecting < self.max_conns:
            self._open()

    def _open(self) -> None:
        self.connecting += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
        except OSError:
            self.connecting -= 1
            if self.backlog:  # a refused connection fails one waiting request, not all
                i, _ = self.backlog.popleft()
                self.rec.finish(i, CONNECT_ERROR)
            return
        self.connecting -= 1
        self.conns.add(conn)
        self.peak_conns = max(self.peak_conns, len(self.conns))
        self.idle_or_next(conn)

    def idle_or_next(self, conn: Conn) -> None:
        if self.backlog:
            i, payload = self.backlog.popleft()
            conn.send(i, payload)
        else:
            self.idle.append(conn)

    def lost(self, conn: Conn) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.backlog and len(self.conns) + self.connecting < self.max_conns:
            self._open()

    async def prewarm(self, n: int) -> None:
        for _ in range(min(n, self.max_conns) - len(self.conns)):
            self._open()
        while self.connecting:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """End of a rung: drop every connection; late answers must not reach the next rung."""
        for conn in list(self.conns):
            conn.current = -1
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        self.conns.clear()
        self.idle.clear()
        self.backlog.clear()


def render(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes and all their children (workers)."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def scrape(url: str | None) -> dict[str, float] | None:
    """The service's /metrics as {sample name with labels: value}; None without a URL."""
    if not url:
        return None
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


def delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """What a rung added to the service's counters and histograms."""
    if before is None or after is None:
        return {}
    return {
        name: value - before.get(name, 0.0)
        for name, value in after.items()
        if name.startswith("rerank_") and "_created" not in name
    }


def freeze_heap() -> None:
    """Collect, then move every live object out of the collector's reach, before a load.

    A full collection stops this process's loop while it scans every object, and the stop
    counts as the service's latency: in chaos.py's process, which holds PyTorch's objects
    (206,000 in all), one took 241 ms in the middle of a Redis fault, and the eight answers
    then in flight came back at 233-296 ms although the service's log timed them at 51-54
    ms (2026-11-29). A full collection of gen.py's own process takes 25 ms here. Frozen,
    only what the load itself makes is scanned.
    """
    gc.collect()
    gc.freeze()


def pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if len(values) else None


async def run_rung(
    pool: Pool,
    payloads: list[bytes],
    rate: float,
    duration: float,
    grace: float,
    pids: dict[str, list[int]],
    metrics_url: str | None,
) -> dict[str, Any]:
    n = max(1, round(rate * duration))
    rec = pool.rec = Recorder(n)
    freeze_heap()
    await pool.prewarm(max(4, min(64, int(rate * 0.01) + 4)))
    lag = np.zeros(n)
    before = scrape(metrics_url)  # outside the CPU window: a scrape costs the server too
    cpu0 = {name: cpu_seconds(p) for name, p in pids.items()}
    own0 = own_cpu()
    t0 = perf() + 0.01
    rec.due[:] = t0 + np.arange(n) / rate
    i = 0
    while i < n:
        now = perf()
        while i < n and rec.due[i] <= now:
            lag[i] = now - rec.due[i]
            pool.dispatch(i, payloads[i % len(payloads)])
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, rec.due[i] - perf()))
    deadline = rec.due[-1] + grace
    while rec.open > 0 and perf() < deadline:
        await asyncio.sleep(0.005)
    for j in np.flatnonzero(np.isnan(rec.done)).tolist():
        rec.done[j] = max(perf(), deadline)
        rec.status[j] = TIMEOUT
    rec.open = 0
    own = own_cpu() - own0
    cpu = {name: cpu_seconds(p) - cpu0[name] for name, p in pids.items()}
    pool.close()
    after = scrape(metrics_url)
    window = max(duration, float(np.nanmax(rec.done)) - t0)
    sent = rec.sent > 0
    ok = rec.status == 200
    latency = rec.done - rec.due  # from the due time: queueing is never hidden
    service_time = (rec.done - rec.sent)[ok & sent]
    return {
        "offered_rps": rate,
        "duration_s": duration,
        "requests": n,
        "ok": int(ok.sum()),
        "achieved_rps": float(ok.sum()) / window,
        "degraded": int((ok & rec.degraded).sum()),
        "shed": int((rec.status == SHED).sum()),
        "errors": int((~ok & (rec.status != SHED)).sum()),
        "timeouts": int((rec.status == TIMEOUT).sum()),
        "latency_ms": {
            "p50": pct(latency, 50),
            "p90": pct(latency, 90),
            "p99": pct(latency, 99),
            "p99.9": pct(latency, 99.9),
            "max": pct(latency, 100),
        },
        "service_time_ms": {"p50": pct(service_time, 50), "p99": pct(service_time, 99)},
        "generator": {
            "cpu_s": own,
            "cpu_cores": own / window,
            "send_lag_ms": {"p50": pct(lag, 50), "p99": pct(lag, 99), "max": pct(lag, 100)},
            "peak_connections": pool.peak_conns,
        },
        "cpu_s": cpu,
        "cpu_ms_per_request": {k: 1000 * v / max(1, int(ok.sum())) for k, v in cpu.items()},
        "metrics": delta(before, after),
    }


def good(rung: dict[str, Any], slo_ms: float) -> bool:
    """Within the latency objective and answering (at most 1% refused, failed or degraded)."""
    bad = rung["errors"] + rung["shed"] + rung["degraded"]
    p99 = rung["latency_ms"]["p99"]
    return p99 is not None and p99 <= slo_ms and bad <= 0.01 * rung["requests"]


def saturated(rung: dict[str, Any], sat_ms: float) -> bool:
    p99 = rung["latency_ms"]["p99"]
    bad = rung["errors"] + rung["shed"]
    return (
        rung["achieved_rps"] < 0.9 * rung["offered_rps"]
        or p99 is None
        or p99 > sat_ms
        or bad > 0.05 * rung["requests"]
    )


async def ladder(args: argparse.Namespace, payloads: list[bytes]) -> dict[str, Any]:
    pool = Pool(args.host, args.port, args.max_conns)
    pids = {name: [int(p) for p in group.split(",") if p] for name, group in args.pids}
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.verbose else None

    async def rung(rate: float, duration: float) -> dict[str, Any]:
        result = await run_rung(pool, payloads, rate, duration, args.grace, pids, args.metrics_url)
        if say:
            lat = result["latency_ms"]
            say(
                f"  {rate:8.1f} rps offered  {result['achieved_rps']:8.1f} achieved  "
                f"p50 {lat['p50']:7.2f}  p99 {lat['p99']:8.2f} ms  "
                f"err {result['errors']} shed {result['shed']} degr {result['degraded']}  "
                f"gen cpu {result['generator']['cpu_cores']:.2f} "
                f"lag p99 {result['generator']['send_lag_ms']['p99']:.2f} ms"
            )
        await asyncio.sleep(args.pause)
        return result

    if args.warmup > 0:
        await rung(args.rates[0] if args.rates else args.start, args.warmup)
    rungs: list[dict[str, Any]] = []
    rates = args.rates or [args.start * args.factor**i for i in range(args.max_rungs)]
    for rate in rates:
        rungs.append(await rung(rate, args.duration))
        if not args.rates and saturated(rungs[-1], args.saturation_ms):
            break
    # Bisect between the last rung within the objective and the first past it.
    for _ in range(args.refine):
        ok = [r for r in rungs if good(r, args.slo_ms)]
        over = [r for r in rungs if not good(r, args.slo_ms)]
        if not ok or not over:
            break
        lo = max(r["offered_rps"] for r in ok)
        above = [r["offered_rps"] for r in over if r["offered_rps"] > lo]
        if not above:
            break
        rungs.append(await rung((lo + min(above)) / 2, args.duration))
    rungs.sort(key=lambda r: r["offered_rps"])
    within = [r for r in rungs if good(r, args.slo_ms)]
    best = max((r["achieved_rps"] for r in within), default=0.0)
    half = None
    if args.half and best > 0:
        half = await rung(best / 2, HALF_RUNG_FACTOR * args.duration)
    return {
        "rungs": rungs,
        "slo_p99_ms": args.slo_ms,
        "max_rps_within_slo": best,
        "half": half,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--traffic", type=Path, required=True, help="traffic file (loadtest/traffic)")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--limit", type=int, default=20000, help="most distinct requests rendered")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="explicit rates (req/s); else a ladder from --start")  # fmt: skip
    p.add_argument("--start", type=float, default=50.0)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--max-rungs", type=int, default=10)
    p.add_argument("--refine", type=int, default=2, help="bisection rungs at the SLO edge")
    p.add_argument("--half", action="store_true", help="one more rung at half the max rate")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per rung")
    p.add_argument(
        "--warmup", type=float, default=2.0, help="seconds at the first rate, unreported"
    )
    p.add_argument("--grace", type=float, default=3.0, help="wait for answers after a rung")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between rungs")
    p.add_argument("--slo-ms", type=float, default=50.0)
    p.add_argument("--saturation-ms", type=float, default=1000.0)
    p.add_argument("--max-conns", type=int, default=512)
    p.add_argument("--pids", nargs=2, action="append", default=[], metavar=("NAME", "PIDS"),
                   help="processes whose CPU each rung reports: service 123,456")  # fmt: skip
    p.add_argument("--metrics-url", default=None, help="scraped after each rung")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    data = traffic_file.read(args.traffic)
    payloads = [
        render(args.host, args.port, path, body)
        for path, body in traffic_file.bodies(data, args.candidates, args.k, args.limit)
    ]
    del data
    import uvloop

    result = uvloop.run(ladder(args, payloads))
    result["candidates"] = args.candidates
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
