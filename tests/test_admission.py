"""The adaptive in-flight limit, driven by a clock the test moves (a pure unit test)."""

from __future__ import annotations

import asyncio

from app.admission import FLOOR, WINDOW_S, Admission
from app.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admission(ceiling: int = 64, target_ms: float = 10.0) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(ceiling, target_ms / 1000, Metrics(), clock), clock


def window(adm: Admission, clock: Clock, wait_s: float, n: int = 20) -> None:
    """One window in which ``n`` requests waited ``wait_s`` for the model."""
    for _ in range(n):
        adm.observe_wait(wait_s)
    clock.now += WINDOW_S
    adm.observe_wait(wait_s)  # the first observation past the window moves the limit


def test_starts_at_the_ceiling_and_refuses_past_it() -> None:
    adm, _ = admission(ceiling=8)
    assert adm.limit == 8
    assert adm.admits(7) and not adm.admits(8)


def test_long_waits_two_windows_running_cut_the_limit_by_a_quarter_down_to_the_floor() -> None:
    adm, clock = admission()
    window(adm, clock, wait_s=0.05)
    assert adm.limit == 64  # one bad window may be a burst: no cut yet
    window(adm, clock, wait_s=0.05)
    assert adm.limit == 48
    window(adm, clock, wait_s=0.001)
    window(adm, clock, wait_s=0.05)
    assert adm.limit == 48  # good, bad: not two in a row
    for _ in range(30):
        window(adm, clock, wait_s=0.05)
    assert adm.limit == FLOOR
    assert adm.metrics.admission_limit._value.get() == FLOOR  # exported


def test_short_waits_grow_the_limit_by_an_eighth_only_when_it_refused() -> None:
    adm, clock = admission()
    for _ in range(40):
        window(adm, clock, wait_s=0.05)
    assert adm.limit == FLOOR
    window(adm, clock, wait_s=0.001)
    assert adm.limit == FLOOR  # within the target but never full: no reason to grow
    assert not adm.admits(FLOOR)
    window(adm, clock, wait_s=0.001)
    assert adm.limit == FLOOR + 1  # at least one
    adm.limit = 40
    adm.admits(40)
    window(adm, clock, wait_s=0.001)
    assert adm.limit == 45


def test_the_limit_never_passes_the_ceiling() -> None:
    adm, clock = admission(ceiling=5)
    for _ in range(10):
        adm.admits(5)
        window(adm, clock, wait_s=0.0)
    assert adm.limit == 5


def test_event_loop_lag_counts_like_a_wait() -> None:
    adm, clock = admission()
    for _ in range(2):
        adm.observe_lag(0.05)
        clock.now += WINDOW_S
        adm.observe_lag(0.05)
    assert adm.limit == 48


def test_target_zero_keeps_the_fixed_limit() -> None:
    adm, clock = admission(ceiling=16, target_ms=0)
    for _ in range(5):
        window(adm, clock, wait_s=1.0)
    assert adm.limit == 16


def test_no_ceiling_admits_everything() -> None:
    adm, _ = admission(ceiling=0)
    assert adm.admits(10_000)


def test_the_lag_probe_runs_and_stops() -> None:
    async def main() -> float:
        adm = Admission(64, 0.01, Metrics())
        adm.start()
        await asyncio.sleep(0.1)
        lag = adm._lag
        await adm.close()
        return lag

    assert 0.0 <= asyncio.run(main()) < 1.0
