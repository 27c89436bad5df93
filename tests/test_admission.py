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
    limit: int = 2, waiting: int = 4, target_s: float = 0.05, timeout_s: float = 5.0
) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(limit, waiting, target_s, timeout_s, Metrics(), clock), clock


async def admitted(adm: Admission) -> Ticket:
    """A ticket that ``adm`` grants at once: a free slot is expected."""
    ticket = await adm.enter()
    assert ticket is not None
    return ticket


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


def test_once_the_oldest_cannot_make_the_target_the_newest_goes_first() -> None:
    async def main() -> None:
        adm, clock = admission(limit=1, target_s=0.05)
        held = await admitted(adm)
        old = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.06  # the oldest has waited past the target
        new = asyncio.create_task(adm.enter())
        await settle()
        adm.leave(held)
        await settle()
        assert new.done() and not old.done()
        ticket = new.result()
        assert ticket is not None
        adm.leave(ticket)  # nothing fresher waits: the old one is served after all
        await settle()
        assert old.done() and old.result() is not None

    asyncio.run(main())


def test_the_time_a_slot_is_held_counts_toward_the_target() -> None:
    async def main() -> None:
        adm, clock = admission(limit=1, target_s=0.05)
        adm.hold_s = 0.04  # slots are held 40 ms on average
        held = await admitted(adm)
        old = asyncio.create_task(adm.enter())
        await settle()
        clock.now = 0.02  # 20 ms waited + 40 ms in a slot: past the target
        new = asyncio.create_task(adm.enter())
        await settle()
        held.started = clock.now - 0.04
        adm.leave(held)
        await settle()
        assert new.done() and not old.done()
        old.cancel()

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
