"""Admission: slots, the waiting line and its deadline; slow clients against a real server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from app.admission import Admission, Ticket
from app.config import Settings
from app.metrics import Metrics
from app.protocol import MAX_HEADER_BYTES, BoundedHttpTools
from tests.serving import running


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admission(
    limit: int = 2,
    waiting: int = 4,
    target_s: float = 0.05,
    timeout_s: float = 5.0,
    interval_s: float = 0.1,
) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(limit, waiting, target_s, timeout_s, Metrics(), clock, interval_s), clock


async def admitted(adm: Admission) -> Ticket:
    """A ticket that ``adm`` grants at once: a free slot is expected."""
    ticket = await adm.enter()
    assert ticket is not None
    return ticket


async def old_and_new(
    adm: Admission, clock: Clock, at: float
) -> tuple[Ticket, asyncio.Task[Ticket | None], asyncio.Task[Ticket | None]]:
    """The one slot held, a waiter from time 0 and another from ``at``: (held, old, new)."""
    held = await admitted(adm)
    old = asyncio.create_task(adm.enter())
    await settle()
    clock.now = at
    new = asyncio.create_task(adm.enter())
    await settle()
    return held, old, new


async def one_served_one_aside(
    adm: Admission, clock: Clock
) -> tuple[list[asyncio.Task[Ticket | None]], Ticket]:
    """Two waiters behind the one slot until the line stands (t = 0.12); the slot comes free:
    the newer is served, the older set aside. Returns both waiters and the newer's ticket."""
    held = await admitted(adm)
    waiters = [asyncio.create_task(adm.enter()) for _ in range(2)]
    await settle()
    clock.now = 0.12
    adm.leave(held)
    await settle()
    served = waiters[1].result()
    assert served is not None and adm.waiting == 0 and adm.aside == 1
    return waiters, served


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_slots_at_once_then_the_line_in_arrival_order() -> None:
    async def main() -> None:
        adm, clock = admission(limit=2)
        first, second = await admitted(adm), await admitted(adm)
        assert adm.inflight == 2
        waiters = [asyncio.create_task(adm.enter()) for _ in range(2)]
        await settle()
        assert adm.waiting == 2 and not any(w.done() for w in waiters)
        adm.leave(first)  # the slot passes to the oldest waiter, which can still make it
        await settle()
        assert waiters[0].done() and not waiters[1].done()
        assert adm.inflight == 2 and adm.waiting == 1
        adm.leave(second)
        done = [await w for w in waiters]
        for ticket in done:
            assert ticket is not None
            adm.leave(ticket)
        assert adm.inflight == 0 and adm.waiting == 0

    asyncio.run(main())


def test_a_waiter_without_a_slot_by_the_deadline_is_refused() -> None:
    async def main() -> None:
        adm, _ = admission(limit=1, timeout_s=0.05)
        held = await admitted(adm)
        assert await adm.enter() is None  # waited out the deadline
        assert adm.waiting == 0 and adm.inflight == 1
        adm.leave(held)
        assert adm.inflight == 0

    asyncio.run(main())


def test_a_full_line_refuses_at_once() -> None:
    async def main() -> None:
        adm, _ = admission(limit=1, waiting=2)
        await admitted(adm)
        line = [asyncio.create_task(adm.enter()) for _ in range(2)]
        await settle()
        assert adm.full()
        assert await adm.enter() is None  # no wait: the line is full
        for task in line:
            task.cancel()
        await asyncio.gather(*line, return_exceptions=True)
        assert adm.waiting == 0 and not adm.full()

    asyncio.run(main())


def test_a_burst_drains_in_arrival_order_and_sets_aside_what_is_past_the_target() -> None:
    """A line that emptied within the interval is a burst: served oldest first, except the
    waiters that can no longer make the target, which are set aside, never served late."""

    async def main() -> None:
        adm, clock = admission(limit=1, target_s=0.05, interval_s=0.1)
        held = await admitted(adm)
        old = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.03
        middle = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.04
        young = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.06  # old has waited 60 ms, past the target; the line is 60 ms old
        assert not adm.standing(clock.now)
        adm.leave(held)
        await settle()
        assert middle.done() and not old.done() and not young.done()
        assert adm.aside == 1
        ticket = middle.result()
        assert ticket is not None
        adm.leave(ticket)
        await settle()
        assert young.done() and young.result() is not None
        old.cancel()
        await asyncio.gather(old, return_exceptions=True)

    asyncio.run(main())


def test_a_standing_line_serves_the_newest_and_sets_the_stale_aside() -> None:
    """A line not empty for the interval stands: the newest goes first, and a waiter that
    cannot make the target is never served, even once nothing fresher waits."""

    async def main() -> None:
        adm, clock = admission(limit=1, waiting=4, target_s=0.05, interval_s=0.1)
        # the line has stood for the interval; old waited 120 ms
        held, old, new = await old_and_new(adm, clock, 0.12)
        assert adm.standing(clock.now)
        adm.leave(held)
        await settle()
        assert new.done() and not old.done()
        assert adm.waiting == 0 and adm.aside == 1  # old: set aside, not in line
        assert not adm.full()  # 1 set aside + 0 waiting < 4
        ticket = new.result()
        assert ticket is not None
        adm.leave(ticket)  # nothing fresher waits, yet old is not served late
        await settle()
        assert not old.done() and adm.inflight == 0
        old.cancel()
        await asyncio.gather(old, return_exceptions=True)
        assert adm.aside == 0

    asyncio.run(main())


def test_a_set_aside_waiter_is_refused_at_its_deadline() -> None:
    async def main() -> None:
        # The deadline runs on the event loop's real clock: long enough that a loaded machine
        # reaches the set-aside before it, short enough for a test.
        adm, clock = admission(limit=1, target_s=0.05, timeout_s=1.0, interval_s=0.1)
        held, old, new = await old_and_new(adm, clock, 0.12)
        adm.leave(held)  # the line stands: new gets the slot, old is set aside
        assert adm.aside == 1 and adm.waiting == 0
        assert await old is None  # the 503, at the deadline
        assert adm.aside == 0
        ticket = await new
        assert ticket is not None
        adm.leave(ticket)
        assert adm.inflight == 0

    asyncio.run(main())


def test_set_aside_requests_count_toward_a_full_line() -> None:
    async def main() -> None:
        adm, clock = admission(limit=1, waiting=2, target_s=0.05, interval_s=0.1)
        held = await admitted(adm)
        stale = [asyncio.create_task(adm.enter()) for _ in range(2)]
        await settle()
        clock.now = 0.12
        assert await adm.enter() is None and adm.full()  # slot and line taken: at once
        adm.leave(held)  # the newest stale waiter is served, the other set aside
        await settle()
        assert adm.waiting == 0 and adm.aside == 1 and adm.inflight == 1
        waiter = asyncio.create_task(adm.enter())  # room for one more: 1 aside + 1 waiting
        await settle()
        assert adm.full()
        for task in (*stale, waiter):
            task.cancel()
        await asyncio.gather(*stale, waiter, return_exceptions=True)
        assert adm.aside == 0 and adm.waiting == 0

    asyncio.run(main())


def test_the_time_a_slot_is_held_counts_toward_the_target() -> None:
    async def main() -> None:
        adm, clock = admission(limit=1, target_s=0.05, interval_s=0.1)
        held = await admitted(adm)
        early = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.10
        middle = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.12  # standing; middle has waited 20 ms
        newest = asyncio.create_task(adm.enter())
        await settle()
        adm.hold_s = 0.04  # slots are held 40 ms on average: 20 + 40 is past the target
        held.started = clock.now - 0.04
        adm.leave(held)
        await settle()
        assert newest.done() and adm.aside == 2 and adm.waiting == 0
        assert not middle.done() and not early.done()
        for task in (early, middle):
            task.cancel()
        await asyncio.gather(early, middle, return_exceptions=True)

    asyncio.run(main())


def test_a_line_emptied_by_setting_waiters_aside_still_stands() -> None:
    """The overload is not over because its stale waiters were set aside: the next ones are
    still served newest first."""

    async def main() -> None:
        adm, clock = admission(limit=1, target_s=0.05, interval_s=0.1)
        waiters, running = await one_served_one_aside(adm, clock)
        clock.now = 0.13
        first = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.14
        second = asyncio.create_task(adm.enter())
        await settle()
        adm.leave(running)
        await settle()
        assert adm.standing(clock.now)
        assert second.done() and not first.done()  # newest first: still standing
        for task in (waiters[0], first):
            task.cancel()
        await asyncio.gather(waiters[0], first, return_exceptions=True)

    asyncio.run(main())


def test_once_a_slot_comes_free_with_nobody_in_line_or_aside_it_is_a_burst_again() -> None:
    async def main() -> None:
        adm, clock = admission(limit=1, target_s=0.05, interval_s=0.1)
        waiters, served = await one_served_one_aside(adm, clock)
        adm.leave(served)  # nobody in line, but one set aside still comes back: still standing
        assert adm.inflight == 0 and adm.standing(clock.now)
        waiters[0].cancel()  # its 503 is sent
        await asyncio.gather(waiters[0], return_exceptions=True)
        running = await adm.enter()  # a free slot at once
        assert running is not None
        adm.leave(running)  # a free slot, nobody in line or aside: the overload is over
        assert not adm.standing(clock.now)
        running = await adm.enter()
        assert running is not None
        clock.now = 0.13
        first = asyncio.create_task(adm.enter())
        await settle()
        second = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.16  # both within the target, the line only 30 ms old
        assert not adm.standing(clock.now)
        adm.leave(running)
        await settle()
        assert first.done() and not second.done()  # oldest first
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)

    asyncio.run(main())


def test_alone_while_one_request_at_most_is_in_a_slot_and_nobody_waits() -> None:
    async def main() -> None:
        adm, _ = admission(limit=1)
        assert adm.alone()
        held = await admitted(adm)
        assert adm.alone()  # the one request in flight is the one asking
        waiter = asyncio.create_task(adm.enter())
        await settle()
        assert not adm.alone()  # someone waits for the slot
        adm.leave(held)
        ticket = await waiter
        assert ticket is not None and adm.alone()
        adm.leave(ticket)
        two, _ = admission(limit=2)
        await admitted(two), await admitted(two)
        assert not two.alone()

    asyncio.run(main())


def test_without_a_limit_nobody_is_alone() -> None:
    """Admission off does not count the requests in flight, so it cannot tell."""

    async def main() -> None:
        adm, _ = admission(limit=0, waiting=0)
        assert not adm.alone()

    asyncio.run(main())


def test_no_limit_admits_everything() -> None:
    async def main() -> None:
        adm, _ = admission(limit=0, waiting=0)
        tickets = [await adm.enter() for _ in range(100)]
        assert all(isinstance(t, Ticket) for t in tickets) and not adm.full()

    asyncio.run(main())


# --- Slow clients against a real server ---------------------------------------------------

BODY = {"user_id": "s", "candidates": ["1", "2", "3"], "k": 2}


def slow_body(port: int, stop: threading.Event, answers: list[bytes]) -> None:
    """Headers with Content-Length 100, then one byte at a time until told to stop."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        try:
            while not stop.wait(0.2):
                s.sendall(b" ")
        except OSError:  # closed by the server: the body deadline passed
            pass
        try:
            answers.append(s.recv(4096))
        except OSError:
            answers.append(b"")


def test_slow_bodies_hold_no_slot_and_lock_nobody_out(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    """24 connections that send their body a byte at a time: a normal caller is answered
    all along, and a burst of 12 right after; the slow ones get 408 and are closed."""
    settings = settings_factory(body_timeout_s=1.5)
    with running(settings, http=BoundedHttpTools) as url:
        port = int(url.rsplit(":", 1)[1])
        stop = threading.Event()
        answers: list[bytes] = []
        slow = [threading.Thread(target=slow_body, args=(port, stop, answers)) for _ in range(24)]
        for thread in slow:
            thread.start()
        codes = []
        with httpx.Client(base_url=url, timeout=10) as client:
            end = time.monotonic() + 3.0  # past the body deadline: the slow ones are cut off
            while time.monotonic() < end:
                codes.append(client.post("/rerank", json=BODY).status_code)
                time.sleep(0.02)
            stop.set()
            for thread in slow:
                thread.join(10)

            async def burst() -> list[int]:
                async with httpx.AsyncClient(base_url=url, timeout=10) as burst_client:
                    calls = (burst_client.post("/rerank", json=BODY) for _ in range(12))
                    return [r.status_code for r in await asyncio.gather(*calls)]

            burst_codes = asyncio.run(burst())
            metrics = client.get("/metrics").text
    assert codes and codes.count(200) >= 0.95 * len(codes), codes
    assert burst_codes == [200] * 12
    assert all(a.startswith(b"HTTP/1.1 408") or a == b"" for a in answers), answers[:3]
    assert any(a.startswith(b"HTTP/1.1 408") for a in answers)
    assert 'route="/rerank",status="408"' in metrics


@pytest.mark.parametrize("path", ["/rerank", "/events"])
def test_the_body_deadline_answers_408_and_closes(
    loaded: str, settings_factory: Callable[..., Settings], path: str
) -> None:
    with running(settings_factory(body_timeout_s=0.3), http=BoundedHttpTools) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
            answer = b""
            while chunk := s.recv(4096):  # until the server closes the connection
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"connection: close" in answer.lower()


def test_headers_past_the_limit_are_refused_before_the_app(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    with running(settings_factory(), http=BoundedHttpTools) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            padding = b"x" * MAX_HEADER_BYTES
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + padding + b"\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):  # until the server closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400")
        assert httpx.get(f"{url}/healthz").status_code == 200  # others are served
