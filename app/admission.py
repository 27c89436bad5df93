"""Adaptive admission: how many /rerank and /events requests one process works on at once.

A fixed in-flight cap suits one machine only. At 64 on a 2-core box, three times the
capacity offered for 30 s kept 64 requests queued inside the process, and the accepted ones
waited: p99 670 ms against 17 ms unloaded. A cap low enough for that box would starve a GPU
box of the concurrency its batches need. By Little's law the time a request spends in the
process is the number in flight over the throughput, so the limit follows that time, AIMD
as in TCP congestion control, every 100 ms window:

- the signal is the 90th percentile of the time work requests spent in the process, less
  the time they waited on Redis;
- past the target, the limit is cut only in a window in which it turned a request away:
  then it is the bottleneck, and it is cut in proportion (target / signal), down to
  ``FLOOR``. Slow answers at a load the limit does not reach (another process taking the
  CPU, a model loading) would not get faster for refusals;
- within the target, it grows by half (at least one) after a window in which it refused,
  up to ``max_inflight``; without refusals it only drifts back up to ``START`` (one a
  window), so that normal traffic after an overload is not refused for long;
- it starts at ``START``, not at the ceiling, and never drifts above it unpressed: what
  the limit allows unpressed is what the first moment of the next overload lets in at once
  (at 64: p50 78 ms in the first second, which alone made the run's p99);
- a window that has refused closes early, once ``EARLY_SLOW`` of its answers were past the
  target: at the onset, waiting out the 100 ms let more in behind the first ``START`` (61
  answers over 15 ms in the first second of a run; 18 and 39 with the early close).

The target is the setting, or ``base_ratio`` times the signal's own unloaded value when
that is more (``_note_base``): a target below what unloaded requests already take would cut
the limit at every refusal and never let it grow.

Time waiting on Redis is left out of the signal: a sick Redis is not the process's
overload, and its answers are degraded 200s. Those requests still count against the limit
(parking them, so that they did not, let in everything an overloaded loop was slow to hand
its Redis replies to: p50 100 ms). ``START`` is above what a Redis at its deadline holds in
flight at a normal load (200 req/s x 50 ms = 10): at 6, a 2-s Redis freeze got 4 and 83 of
its 1,100 requests refused in two chaos runs, at 16 none.

A target of 0 turns this off: the limit stays at ``max_inflight``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from app.metrics import Metrics

# The smallest limit the controller sets. At 2 on the 2-core box (load generator included),
# three times capacity kept the time in the process past the target and the accepted p99 at
# 16-20 ms; at 1, 14.6 ms, for 241 req/s accepted against 256.
FLOOR = 1
START = 16  # the limit before the controller has seen any pressure
WINDOW_S = 0.1  # how often the limit moves
MAX_CUT = 0.1  # a window's cut leaves at least this share of the limit
EARLY_SLOW = 4  # slow answers that close a refusing window early (see above)
BASE_DRIFT = 0.01  # how far the unloaded time may rise per unpressed window (1% in 100 ms)
BASE_SAMPLES = 5  # fewer answers in a window say too little about its p90


class Admission:
    def __init__(
        self,
        max_inflight: int,
        target_s: float,
        metrics: Metrics,
        base_ratio: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.ceiling = max_inflight  # 0: no limit at all
        self.floor_target_s = target_s  # the setting: the target never goes below it
        self.target_s = target_s
        self.base_ratio = base_ratio  # 0: the target stays at the setting
        self.base_s: float | None = None  # the unloaded time in the process, once seen
        self.metrics = metrics
        self.clock = clock
        self.limit = min(START, max_inflight) if self.adaptive else max_inflight
        self._times: list[float] = []
        self._slow = 0  # answers of this window past the target
        self._refused = False
        self._window_end = clock() + WINDOW_S
        metrics.admission_limit.set(self.limit)
        metrics.admission_target.set(target_s)

    @property
    def adaptive(self) -> bool:
        return self.ceiling > 0 and self.floor_target_s > 0

    def admits(self, inflight: int) -> bool:
        """Whether one more request may start now, with ``inflight`` already admitted."""
        if self.ceiling == 0 or inflight < self.limit:
            return True
        self._refused = True
        return False

    def enter(self) -> Visit:
        """An admitted request starts (in its own task: the visit is its context's)."""
        visit = Visit(self.clock())
        _VISIT.set(visit)
        return visit

    def leave(self, visit: Visit) -> None:
        """The request has been answered: its time in the process, less Redis, is a sample."""
        self.observe(self.clock() - visit.started - visit.redis_s)

    def observe(self, seconds: float) -> None:
        if not self.adaptive:
            return
        self._times.append(seconds)
        self._slow += seconds > self.target_s
        now = self.clock()
        if now >= self._window_end or (self._refused and self._slow >= EARLY_SLOW):
            self._window_end = now + WINDOW_S
            self._adjust()

    def _adjust(self) -> None:
        times, self._times, self._slow = sorted(self._times), [], 0
        refused, self._refused = self._refused, False
        if not times:
            return
        p90 = times[int(0.9 * (len(times) - 1))]
        if not refused and self.base_ratio > 0 and len(times) >= BASE_SAMPLES:
            self._note_base(p90)
        if p90 > self.target_s:
            if refused:
                cut = max(MAX_CUT, self.target_s / p90)
                self.limit = max(FLOOR, int(self.limit * cut))
        elif refused:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 2))
        elif self.limit < START:
            self.limit += 1
        self.metrics.admission_limit.set(self.limit)

    def _note_base(self, p90: float) -> None:
        """A window the limit did not press: its 90th percentile updates the unloaded time, a
        minimum that forgets slowly, and the target follows it.

        A fixed target suits one machine's speed only. Where the unloaded p90 is past it (a
        slower machine, or one sharing its cores), every refusal cuts the limit and none lets
        it grow. With two busy loops beside the service on the 2-core box, 80 req/s after a
        3 s burst at 300 had 32 and 50 requests shed in 10 s, the limit held at 1 or 2; with
        the target at 1.8x the unloaded p90 (13 ms there), none, the limit back at 16, and the
        burst answered at 123-152 req/s against 86-105 (two runs each, alternating). The
        committed run of loadtest/admission.py saw neither arm shed after the burst: how much
        this buys depends on how far past the target the machine is pushed.
        A minimum, because load only adds time; it forgets, so that a machine that has turned
        slower for good is followed; and only in windows without refusals, so that an
        overload does not teach it that slow is normal.
        """
        self.base_s = p90 if self.base_s is None else min(self.base_s * (1 + BASE_DRIFT), p90)
        self.target_s = max(self.floor_target_s, self.base_ratio * self.base_s)
        self.metrics.admission_target.set(self.target_s)


@dataclass
class Visit:
    """One admitted request's stay: when it came in, how long it has waited on Redis."""

    started: float
    redis_s: float = 0.0


_VISIT: ContextVar[Visit | None] = ContextVar("rerank_visit", default=None)


def waited_on_redis(seconds: float) -> None:
    """The store reports each Redis call's time, as it measured it, for the current request."""
    visit = _VISIT.get()
    if visit is not None:  # None: start-up, the version watcher; not a request
        visit.redis_s += seconds
