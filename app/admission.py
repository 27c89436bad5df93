"""Admission: which /rerank and /events requests the process works on now, and which it refuses.

One mechanism decides, with three rules:

- **A fixed number of slots** (``max_inflight``). A request holds one from the moment its
  body has been read until its answer is sent, so the batch queue in front of the model is
  never longer than the slots. The number is enough to fill the model's batches and few
  enough that a request in a slot is answered well within the latency target.
- **A bounded waiting line with a deadline.** A request that finds every slot taken waits
  for one, at most ``queue_timeout_ms``, then gets the 503 with Retry-After. Waiting costs
  the process a timer and no CPU, and it makes a refusal cost the refused caller that time:
  a caller that retries at once, ignoring Retry-After, is slowed down instead of bounced
  back, so refusals cannot multiply until their own handling takes the CPU from the
  requests being served. The line holds at most ``max_waiting`` requests; past that a
  request is refused at once.
- **Fresh requests first under overload.** While the oldest waiter can still be answered
  within the latency target (its wait so far plus the time a slot is held, on average),
  slots go in arrival order. Once it cannot, they go to the newest waiter (adaptive LIFO):
  the requests that are served are answered within the target, and the ones that waited too
  long wait out their deadline instead of being served late.

The limit is fixed on purpose: a controller that moves it with the time spent in a slot
reads the CPU taken by refusals, or by another process, as a reason to cut, and cut down to
a single slot it throws the throughput away (docs/reliability.md, Admission).

A limit of 0 turns admission off: every request is worked on at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from app.metrics import Metrics

# Weight of the newest answer in the running mean of the time a slot is held: about the
# last 16 answers, so the mean follows a change of load within a few batches.
HOLD_WEIGHT = 1 / 16


@dataclass(eq=False)
class Ticket:
    """One request's claim on a slot: when it asked for one, and when it got it."""

    asked: float
    started: float = 0.0
    granted: asyncio.Future[bool] | None = None  # set while it waits in line


class Admission:
    def __init__(
        self,
        max_inflight: int,
        max_waiting: int,
        target_s: float,
        timeout_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.limit = max_inflight  # 0: no limit
        self.max_waiting = max_waiting
        self.target_s = target_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.inflight = 0
        self.hold_s = 0.0  # running mean of the time one request holds its slot
        self._line: deque[Ticket] = deque()
        metrics.admission_limit.set(max_inflight)

    @property
    def waiting(self) -> int:
        return len(self._line)

    def full(self) -> bool:
        """Whether a request arriving now would be refused at once: slots and line taken."""
        return self.limit > 0 and self.inflight >= self.limit and self.waiting >= self.max_waiting

    async def enter(self) -> Ticket | None:
        """A slot for one request: at once, after a wait in line, or None (refused)."""
        now = self.clock()
        ticket = Ticket(asked=now, started=now)
        if self.limit == 0:
            return ticket
        if self.inflight < self.limit and not self._line:
            self.inflight += 1
            return ticket
        if len(self._line) >= self.max_waiting:
            return None
        loop = asyncio.get_running_loop()
        granted = ticket.granted = loop.create_future()
        self._line.append(ticket)
        expiry = loop.call_later(self.timeout_s, self._expire, ticket)
        try:
            if not await granted:
                return None
        except asyncio.CancelledError:  # the request's task is cancelled (shutdown)
            if not granted.cancelled() and granted.done() and granted.result():
                self.leave(ticket)  # handed a slot in the same turn: pass it on
            elif ticket in self._line:
                self._line.remove(ticket)
            raise
        finally:
            expiry.cancel()
        ticket.started = self.clock()
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """The request holding ``ticket`` is answered: its slot goes to a waiter, or is free."""
        if self.limit == 0:
            return
        now = self.clock()
        self.hold_s += HOLD_WEIGHT * (now - ticket.started - self.hold_s)
        while self._line:
            waiter = self._next(now)
            assert waiter.granted is not None
            if not waiter.granted.done():  # done: cancelled while it waited
                waiter.granted.set_result(True)  # the slot passes on: inflight unchanged
                return
        self.inflight -= 1

    def _next(self, now: float) -> Ticket:
        """The waiter a free slot goes to: the oldest while it can still make the target."""
        if now - self._line[0].asked + self.hold_s <= self.target_s:
            return self._line.popleft()
        return self._line.pop()

    def _expire(self, ticket: Ticket) -> None:
        assert ticket.granted is not None
        if not ticket.granted.done():
            self._line.remove(ticket)
            ticket.granted.set_result(False)
