"""Admission: which /rerank and /events requests the process works on now, and which it refuses.

One mechanism decides, with three rules:

- **A fixed number of slots** (``max_inflight``). A request holds one from the moment its
  body has been read until its answer is sent, so the batch queue in front of the model is
  never longer than the slots. A request in a slot is answered in about slots / throughput,
  so the number is enough to fill the model's batches and few enough that this stays well
  within the latency target.
- **A waiting line that tells a burst from a standing queue** (CoDel, as Facebook's "Fail at
  Scale" applies it to requests). A line that has been empty within the last ``interval_s``
  is a burst that drains: it is served in arrival order. A line that has not been empty for
  ``interval_s`` stands: a free slot goes to the newest waiter. Either way the waiters that
  can no longer be answered within the latency target (their wait so far plus the time a
  slot is held, on average) are set aside and never served late. The line stands until a
  slot comes free with nobody in line and nobody set aside: a line emptied by setting
  waiters aside is still the same overload, and the callers set aside come back.
- **A refusal costs the refused caller its deadline.** A waiter that is set aside, or that
  gets no slot in time, gets the 503 with Retry-After ``timeout_s`` after it arrived, not
  at once: a caller that retries at once, ignoring Retry-After, is slowed down instead of
  bounced back, so refusals cannot multiply until their own handling takes the CPU from the
  requests being served. Waiting costs the process a timer and no CPU. The line and the
  set-aside requests together hold at most ``max_waiting``; past that a request is refused
  on arrival, and the gate (app/guard.py) holds its 503 to the same deadline.

The limit is fixed on purpose: a controller that moves it with the time spent in a slot
reads the CPU taken by refusals, or by another process, as a reason to cut, and cut down to
a single slot it throws the throughput away (docs/reliability.md, Overload and admission).
A slot is not held waiting out a Redis that does not answer: the store's breaker
(app/store.py) answers those requests degraded at once, so few slots are enough.

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
    aside: bool = False  # set aside: refused at its deadline, never served


class Admission:
    def __init__(
        self,
        max_inflight: int,
        max_waiting: int,
        target_s: float,
        timeout_s: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.perf_counter,
        interval_s: float = 0.1,
    ) -> None:
        self.limit = max_inflight  # 0: no limit
        self.max_waiting = max_waiting
        self.target_s = target_s
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.clock = clock
        self.inflight = 0
        self.hold_s = 0.0  # running mean of the time one request holds its slot
        self.aside = 0  # requests set aside, waiting for their deadline
        self._line: deque[Ticket] = deque()
        self._empty_at = clock()  # when the line was last empty
        self._standing = False  # the line stood, and no slot has come free since
        metrics.admission_limit.set(max_inflight)

    @property
    def waiting(self) -> int:
        return len(self._line)

    def alone(self) -> bool:
        """Whether the process works on one request at most and nobody waits for a slot.

        False when admission is off: without a limit, the requests in flight are not counted.
        """
        return self.limit > 0 and self.inflight <= 1 and not self._line

    def full(self) -> bool:
        """Whether a request arriving now would be refused on arrival: slots and line taken."""
        return (
            self.limit > 0
            and self.inflight >= self.limit
            and self.waiting + self.aside >= self.max_waiting
        )

    def standing(self, now: float) -> bool:
        """Whether the line stands: it has not been empty for ``interval_s``, or it stood
        and no slot has come free since."""
        return self._standing or (bool(self._line) and now - self._empty_at >= self.interval_s)

    async def enter(self) -> Ticket | None:
        """A slot for one request: at once, after a wait in line, or None (refused)."""
        now = self.clock()
        ticket = Ticket(asked=now, started=now)
        if self.limit == 0:
            return ticket
        if self.inflight < self.limit and not self._line:
            self.inflight += 1
            return ticket
        if len(self._line) + self.aside >= self.max_waiting:
            return None
        loop = asyncio.get_running_loop()
        granted = ticket.granted = loop.create_future()
        if not self._line and not self._standing:
            self._empty_at = now
        self._line.append(ticket)
        expiry = loop.call_later(self.timeout_s, self._expire, ticket)
        try:
            if not await granted:
                return None
        except asyncio.CancelledError:  # the request's task is cancelled (shutdown)
            if not granted.cancelled() and granted.done() and granted.result():
                self.leave(ticket)  # handed a slot in the same turn: pass it on
            else:
                self._forget(ticket)
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
        while (waiter := self._next(now)) is not None:
            assert waiter.granted is not None
            if not waiter.granted.done():  # done: cancelled while it waited
                waiter.granted.set_result(True)  # the slot passes on: inflight unchanged
                return
        self.inflight -= 1
        if not self.aside:  # a free slot, nobody in line, nobody set aside coming back
            self._standing = False

    def _next(self, now: float) -> Ticket | None:
        """The waiter a free slot goes to: the oldest while the line drains; once it stands,
        the newest. Either way the waiters past the target are set aside first. None: nobody
        in line."""
        if not self._line:
            return None
        standing = self.standing(now)
        if standing:
            self._standing = True
            newest = self._line.pop()  # served even past the target: nobody fresher waits
        budget = self.target_s - self.hold_s
        while self._line and now - self._line[0].asked > budget:
            self._set_aside(self._line.popleft())
        if standing:
            return newest
        if not self._line:  # every waiter of the burst was past the target
            return None
        return self._line.popleft()

    def _set_aside(self, ticket: Ticket) -> None:
        assert ticket.granted is not None
        if not ticket.granted.done():
            ticket.aside = True
            self.aside += 1

    def _forget(self, ticket: Ticket) -> None:
        """A waiter leaves without a slot: out of the line, or out of the set-aside count."""
        if ticket.aside:
            ticket.aside = False
            self.aside -= 1
        elif ticket in self._line:
            self._line.remove(ticket)

    def _expire(self, ticket: Ticket) -> None:
        assert ticket.granted is not None
        if not ticket.granted.done():
            self._forget(ticket)
            ticket.granted.set_result(False)
