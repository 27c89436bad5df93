"""The load: one small HTTP/1.1 client and one generator, open loop or closed loop.

Open loop (``open_loop``): request ``i`` is due at ``T0 + i / rate`` and is written then,
whether or not earlier ones have answered. When every connection is busy another is opened
(up to ``max_conns``); beyond that the request waits in a backlog, and its latency still
counts from its due time, so queueing anywhere shows in the percentiles (no coordinated
omission).

Closed loop (``closed_loop``): N connections, each sending its next request as soon as the
last one is answered, ``Retry-After`` ignored: what a pool of impatient callers does. Its
figure is goodput, the 200s per second, and the latency of the 200s from when each was sent.

Why the generator is not what it measures: requests are rendered before a run; the client
is a bare ``asyncio.Protocol`` (one ``write`` out, a ``find`` for the end of the headers in,
a callback, no task per request), several times cheaper per request than httpx
(docs/benchmark.md, "The load generator's client"); and every run reports the generator's
own CPU and, open loop, its send lag (how late each request was written against its due
time). A run whose lag stays at the timer's resolution and whose CPU stays well under a core
was limited by the server.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

perf = time.perf_counter

# Outcomes besides HTTP statuses, as the recorder counts them.
REFUSED = -1  # the connection was refused
TIMEOUT = -2  # no answer within the grace after the run
BAD_RESPONSE = -3  # not HTTP/1.1 with a length, or a 503 without Retry-After
LOST = -4  # the connection closed with the request in flight
SHED = 503

MAX_CONNS = 512
GRACE_S = 3.0  # how long a run waits for its last answers

Done = Callable[[int, bytes], None]


def render(port: int, method: str, path: str, body: bytes = b"") -> bytes:
    """A whole request, head and body."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; each answer to a callback."""

    def __init__(self, on_lost: Callable[[Connection], None] | None = None) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: Done | None = None
        self.need = -1  # bytes of the answer under way, head included; -1: head not read
        self.body_at = 0
        self.status = 0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes, done: Done) -> None:
        assert self.transport is not None
        self.done = done
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0 or not head.startswith(b"http/1.1 "):
                self.close()
                self._finish(BAD_RESPONSE, b"")
                return
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else None])
            self.status = int(head[9:12])
            if self.status == SHED and b"\r\nretry-after:" not in head:
                self.status = BAD_RESPONSE  # a refusal the caller cannot schedule a retry from
            self.closing = b"\r\nconnection: close" in head
            self.body_at = end + 4
            self.need = self.body_at + length
        if len(self.buf) < self.need:
            return
        body = bytes(self.buf[self.body_at : self.need])
        del self.buf[: self.need]
        self.need = -1
        if self.closing:
            self.close()
        self._finish(self.status, body)

    def _finish(self, status: int, body: bytes) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._finish(LOST, b"")
        if self.on_lost is not None:
            self.on_lost(self)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


async def connect(port: int, on_lost: Callable[[Connection], None] | None = None) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(on_lost), "127.0.0.1", port)
    return conn


async def request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on a connection of its own: (status, body)."""
    conn = await connect(port)
    answer: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
    try:
        conn.send(render(port, method, path, body), lambda s, b: answer.set_result((s, b)))
        return await answer
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    """``request`` for code outside an event loop; (REFUSED, b"") when nobody listens."""
    try:
        return asyncio.run(request(port, "GET", path))
    except OSError:
        return REFUSED, b""


class Recorder:
    """Per-request stamps of one run, in lists indexed by request number."""

    def __init__(self) -> None:
        self.due: list[float] = []
        self.sent: list[float] = []
        self.done: list[float] = []  # 0.0: no answer yet
        self.status: list[int] = []
        self.degraded: list[bool] = []
        self.open = 0

    def add(self, due: float) -> int:
        self.due.append(due)
        self.sent.append(0.0)
        self.done.append(0.0)
        self.status.append(0)
        self.degraded.append(False)
        self.open += 1
        return len(self.due) - 1

    def finish(self, i: int, status: int, degraded: bool = False) -> None:
        if self.done[i]:
            return
        self.done[i] = perf()
        self.status[i] = status
        self.degraded[i] = degraded
        self.open -= 1


class Pool:
    """Connections to one port: an idle one reused, another opened up to ``max_conns``.

    ``refill`` makes it a closed loop: a connection that answers (or opens) sends the next
    request it returns, until it returns None.
    """

    def __init__(self, port: int, max_conns: int, rec: Recorder) -> None:
        self.port = port
        self.max_conns = max_conns
        self.rec = rec
        self.idle: deque[Connection] = deque()
        self.conns: set[Connection] = set()
        self.connecting = 0
        self.backlog: deque[tuple[int, bytes]] = deque()
        self.peak_conns = 0
        self.refill: Callable[[], tuple[int, bytes] | None] | None = None
        self.closed = False

    def submit(self, i: int, payload: bytes) -> None:
        if self.idle:
            self._send(self.idle.popleft(), i, payload)
            return
        self.backlog.append((i, payload))
        if len(self.conns) + self.connecting < self.max_conns:
            self._open()

    def _send(self, conn: Connection, i: int, payload: bytes) -> None:
        self.rec.sent[i] = perf()
        conn.send(payload, lambda status, body: self._answered(conn, i, status, body))

    def _answered(self, conn: Connection, i: int, status: int, body: bytes) -> None:
        self.rec.finish(i, status, status == 200 and body.find(b'"degraded":true') >= 0)
        if not conn.closing and not self.closed:
            self._ready(conn)

    def _ready(self, conn: Connection) -> None:
        if self.backlog:
            self._send(conn, *self.backlog.popleft())
        elif self.refill is not None and (nxt := self.refill()) is not None:
            self._send(conn, *nxt)
        else:
            self.idle.append(conn)

    def _open(self) -> None:
        self.connecting += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await connect(self.port, self._lost)
        except OSError:
            self.connecting -= 1
            if self.backlog:  # a refused connection fails one waiting request, not all
                self.rec.finish(self.backlog.popleft()[0], REFUSED)
            elif self.refill is not None and (nxt := self.refill()) is not None:
                self.rec.finish(nxt[0], REFUSED)
                await asyncio.sleep(0.01)
                self._open()
            return
        self.connecting -= 1
        if self.closed:
            conn.close()
            return
        self.conns.add(conn)
        self.peak_conns = max(self.peak_conns, len(self.conns))
        self._ready(conn)

    def _lost(self, conn: Connection) -> None:
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.closed:
            return
        if self.backlog or self.refill is not None:
            if len(self.conns) + self.connecting < self.max_conns:
                self._open()

    async def prewarm(self, n: int) -> None:
        for _ in range(min(n, self.max_conns) - len(self.conns)):
            self._open()
        while self.connecting:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """End of a run: every connection dropped, so late answers reach no later run."""
        self.closed = True
        for conn in list(self.conns):
            conn.done = None
            conn.close()
        self.conns.clear()
        self.idle.clear()
        self.backlog.clear()


def freeze_heap() -> None:
    """Collect, then move every live object out of the collector's reach, before a load.

    A full collection stops this process's loop while it scans every object, and the stop
    would count as the service's latency; a process that holds a large heap (traffic,
    PyTorch) makes it long. Frozen, only what the load itself allocates is scanned.
    """
    gc.collect()
    gc.freeze()


@dataclass
class Run:
    """What one run of the generator saw: per-request stamps as arrays, and its own cost."""

    due: np.ndarray
    sent: np.ndarray
    done: np.ndarray
    status: np.ndarray
    degraded: np.ndarray
    lag: np.ndarray  # open loop: seconds each request was written past its due time
    window_s: float  # from the first due time to the last answer, at least the run's length
    cpu_s: float  # the generator's own CPU (its event loop's thread)
    peak_conns: int

    @property
    def ok(self) -> np.ndarray:
        return self.status == 200

    def latency(self, since_sent: bool = False) -> np.ndarray:
        """Seconds to each answer, from its due time (the generator's lag included) or from
        the moment it was written."""
        return self.done - (self.sent if since_sent else self.due)

    def summary(self, offered_rps: float | None = None) -> dict[str, Any]:
        """The run's figures as the results files keep them (a rung, a closed-loop level)."""
        ok = self.ok
        n = len(self.status)
        latency = self.latency()
        return {
            "offered_rps": offered_rps,
            "duration_s": self.window_s,
            "requests": n,
            "ok": int(ok.sum()),
            "achieved_rps": float(ok.sum()) / self.window_s,
            "degraded": int((ok & self.degraded).sum()),
            "shed": int((self.status == SHED).sum()),
            "errors": int((~ok & (self.status != SHED)).sum()),
            "timeouts": int((self.status == TIMEOUT).sum()),
            "latency_ms": {q: pct(latency, v) for q, v in PERCENTILES.items()},
            "ok_latency_ms": {q: pct(latency[ok], v) for q, v in PERCENTILES.items()},
            "service_time_ms": {
                "p50": pct(self.latency(True)[ok], 50),
                "p99": pct(self.latency(True)[ok], 99),
            },
            "generator": {
                "cpu_s": self.cpu_s,
                "cpu_cores": self.cpu_s / self.window_s,
                "cpu_us_per_request": 1e6 * self.cpu_s / max(1, n),
                "send_lag_ms": {
                    "p50": pct(self.lag, 50),
                    "p99": pct(self.lag, 99),
                    "max": pct(self.lag, 100),
                },  # fmt: skip
                "peak_connections": self.peak_conns,
            },
        }


PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9, "max": 100}


def pct(seconds: np.ndarray, q: float) -> float | None:
    """The q-th percentile in ms; None without samples."""
    return float(np.percentile(seconds, q)) * 1000 if len(seconds) else None


async def _finish(
    pool: Pool, rec: Recorder, t0: float, last_due: float, grace: float, cpu0: float,
    lag: list[float], length_s: float,
) -> Run:  # fmt: skip
    deadline = last_due + grace
    while rec.open > 0 and perf() < deadline:
        await asyncio.sleep(0.005)
    for i, done in enumerate(rec.done):
        if not done:
            rec.done[i] = max(perf(), deadline)
            rec.status[i] = TIMEOUT
    rec.open = 0
    cpu = time.thread_time() - cpu0
    pool.close()
    done_at = np.array(rec.done)
    return Run(
        due=np.array(rec.due),
        sent=np.array(rec.sent),
        done=done_at,
        status=np.array(rec.status, np.int32),
        degraded=np.array(rec.degraded, np.bool_),
        lag=np.array(lag),
        window_s=max(length_s, float(done_at.max(initial=t0)) - t0),
        cpu_s=cpu,
        peak_conns=pool.peak_conns,
    )


async def open_loop(
    port: int,
    payloads: list[bytes],
    rate: float,
    seconds: float | None = None,
    *,
    stop: asyncio.Event | None = None,
    hold: asyncio.Event | None = None,
    max_conns: int = MAX_CONNS,
    grace: float = GRACE_S,
) -> Run:
    """``rate`` requests per second for ``seconds`` (or until ``stop`` is set), open loop.

    While ``hold`` is set the due requests are skipped, as a balancer that saw the instance
    not ready sends it nothing.
    """
    rec = Recorder()
    pool = Pool(port, max_conns, rec)
    freeze_heap()
    await pool.prewarm(max(4, min(64, int(rate * 0.01) + 4)))
    n = max(1, round(rate * seconds)) if seconds is not None else None
    lag: list[float] = []
    cpu0 = time.thread_time()
    t0 = perf() + 0.01
    i = 0
    while True:
        now = perf()
        while (n is None or i < n) and t0 + i / rate <= now:
            due = t0 + i / rate
            if hold is None or not hold.is_set():
                lag.append(now - due)
                pool.submit(rec.add(due), payloads[i % len(payloads)])
            i += 1
        if (n is not None and i >= n) or (stop is not None and stop.is_set()):
            break
        await asyncio.sleep(max(0.0, t0 + i / rate - perf()))
    length = i / rate
    return await _finish(pool, rec, t0, t0 + length, grace, cpu0, lag, length)


async def closed_loop(
    port: int, payloads: list[bytes], connections: int, seconds: float, grace: float = GRACE_S
) -> Run:
    """``connections`` callers for ``seconds``, each sending again as soon as it is answered."""
    rec = Recorder()
    pool = Pool(port, connections, rec)
    freeze_heap()
    counter = itertools.count()
    t0 = perf()
    end = t0 + seconds

    def refill() -> tuple[int, bytes] | None:
        now = perf()
        if now >= end:
            return None
        return rec.add(now), payloads[next(counter) % len(payloads)]

    pool.refill = refill
    cpu0 = time.thread_time()
    await pool.prewarm(connections)  # each connection sends as soon as it is open
    await asyncio.sleep(max(0.0, end - perf()))
    return await _finish(pool, rec, t0, end, grace, cpu0, [], seconds)


def good(rung: dict[str, Any], slo_ms: float) -> bool:
    """Within the latency objective and answering (at most 1% refused, failed or degraded)."""
    bad = rung["errors"] + rung["shed"] + rung["degraded"]
    p99 = rung["latency_ms"]["p99"]
    return p99 is not None and p99 <= slo_ms and bad <= 0.01 * rung["requests"]


def saturated(rung: dict[str, Any], saturation_ms: float) -> bool:
    p99 = rung["latency_ms"]["p99"]
    return (
        rung["achieved_rps"] < 0.9 * rung["offered_rps"]
        or p99 is None
        or p99 > saturation_ms
        or rung["errors"] + rung["shed"] > 0.05 * rung["requests"]
    )


async def ladder(
    rung: Callable[[float], Awaitable[dict[str, Any]]],
    *,
    start: float,
    factor: float,
    max_rungs: int,
    refine: int,
    slo_ms: float = 50.0,
    saturation_ms: float = 1000.0,
    rates: list[float] | None = None,
) -> dict[str, Any]:
    """Open-loop rungs (``rung(rate)`` runs one) from ``start``, ``factor`` apart, until one
    saturates (or the given ``rates``); then ``refine`` bisections between the last rung
    within the objective and the first past it. The capacity is the most answered within it."""
    rungs: list[dict[str, Any]] = []
    for rate in rates or [start * factor**i for i in range(max_rungs)]:
        rungs.append(await rung(rate))
        if not rates and saturated(rungs[-1], saturation_ms):
            break
    for _ in range(refine):
        within = [r["offered_rps"] for r in rungs if good(r, slo_ms)]
        past = [r["offered_rps"] for r in rungs if not good(r, slo_ms)]
        above = [rate for rate in past if within and rate > max(within)]
        if not above:
            break
        rungs.append(await rung((max(within) + min(above)) / 2))
    rungs.sort(key=lambda r: r["offered_rps"])
    best = max((r["achieved_rps"] for r in rungs if good(r, slo_ms)), default=0.0)
    return {"rungs": rungs, "slo_p99_ms": slo_ms, "max_rps_within_slo": best}
