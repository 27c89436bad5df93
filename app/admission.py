"""Adaptive admission: how many /rerank and /events requests one process takes on at once.

A fixed in-flight cap suits one machine only. At 64 on a 2-core box, three times the
capacity offered for 30 s kept 64 requests queued inside the process, and the accepted ones
waited: p99 670 ms against 17 ms unloaded. A cap low enough for that box would starve a GPU
box of the concurrency its batches need. So the cap follows the queueing it causes, AIMD as
in TCP congestion control:

- the signal is waiting, not working: the 90th percentile of the time requests waited for
  the model (the batcher's queue) and the largest event-loop lag (how late a timer fired;
  a loop that is behind delays every request, before the guard even sees it). Time spent
  on a slow Redis is neither, so a sick Redis still gets degraded answers, not 503s;
- after two windows in a row whose signal passed the target, the limit drops by a quarter,
  down to ``FLOOR`` (a few requests in flight, so batches still form). One window is not
  enough: a burst of answers when Redis comes back from a pause lags the loop for a moment,
  and cutting on it turned degraded answers into 503s;
- after a window within the target in which the limit turned a request away, it grows by an
  eighth (at least one), up to ``max_inflight``.

A target of 0 turns this off: the limit stays at ``max_inflight``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from app.metrics import Metrics

FLOOR = 4  # the smallest limit the controller sets
WINDOW_S = 0.1  # how often the limit moves
LAG_PROBE_S = 0.02  # the event-loop lag probe's sleep


class Admission:
    def __init__(
        self,
        max_inflight: int,
        target_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.ceiling = max_inflight  # 0: no limit at all
        self.target_s = target_s
        self.metrics = metrics
        self.clock = clock
        self.limit = max_inflight
        self._waits: list[float] = []
        self._lag = 0.0
        self._refused = False
        self._over = False  # the last window's signal passed the target
        self._window_end = clock() + WINDOW_S
        self._probe: asyncio.Task[None] | None = None
        metrics.admission_limit.set(max_inflight)

    @property
    def adaptive(self) -> bool:
        return self.ceiling > 0 and self.target_s > 0

    def admits(self, inflight: int) -> bool:
        """Whether one more request may start now, with ``inflight`` already running."""
        if self.ceiling == 0 or inflight < self.limit:
            return True
        self._refused = True
        return False

    def observe_wait(self, seconds: float) -> None:
        """One request's wait in the model queue."""
        self._waits.append(seconds)
        self._maybe_adjust()

    def observe_lag(self, seconds: float) -> None:
        self._lag = max(self._lag, seconds)
        self._maybe_adjust()

    def _maybe_adjust(self) -> None:
        now = self.clock()
        if not self.adaptive or now < self._window_end:
            return
        self._window_end = now + WINDOW_S
        waits, self._waits = sorted(self._waits), []
        p90 = waits[int(0.9 * (len(waits) - 1))] if waits else 0.0
        signal, self._lag = max(p90, self._lag), 0.0
        refused, self._refused = self._refused, False
        over = signal > self.target_s
        sustained, self._over = over and self._over, over
        if sustained:
            self.limit = max(min(FLOOR, self.ceiling), self.limit * 3 // 4)
        elif not over and refused:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 8))
        self.metrics.admission_limit.set(self.limit)

    def start(self) -> None:
        if self.adaptive:
            self._probe = asyncio.create_task(self._lag_probe(), name="admission-lag-probe")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def _lag_probe(self) -> None:
        while True:
            start = self.clock()
            await asyncio.sleep(LAG_PROBE_S)
            self.observe_lag(self.clock() - start - LAG_PROBE_S)
