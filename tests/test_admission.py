"""The adaptive in-flight limit, driven by a clock the test moves (a pure unit test)."""

from __future__ import annotations

import contextvars

import pytest

from app.admission import (
    BASE_DRIFT,
    BASE_SAMPLES,
    EARLY_SLOW,
    FLOOR,
    START,
    WINDOW_S,
    Admission,
    waited_on_redis,
)
from app.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admission(
    ceiling: int = 64, target_ms: float = 10.0, base_ratio: float = 0.0
) -> tuple[Admission, Clock]:
    clock = Clock()
    return Admission(ceiling, target_ms / 1000, Metrics(), base_ratio, clock), clock


def window(adm: Admission, clock: Clock, took_s: float, refused: bool, n: int = 20) -> None:
    """One window in which ``n`` requests took ``took_s`` each, some refused or none."""
    if refused:
        assert not adm.admits(adm.limit)
    for _ in range(n):
        adm.observe(took_s)
    clock.now += WINDOW_S
    adm.observe(took_s)  # the first observation past the window moves the limit


def test_starts_below_the_ceiling_and_refuses_past_the_limit() -> None:
    adm, _ = admission(ceiling=64)
    assert adm.limit == START
    assert adm.admits(START - 1) and not adm.admits(START)
    assert admission(ceiling=4)[0].limit == 4


def test_slow_and_refusing_cuts_in_proportion_down_to_the_floor() -> None:
    adm, clock = admission(target_ms=10)
    window(adm, clock, took_s=0.0125, refused=True)
    cut = int(START * 10 / 12.5)
    assert FLOOR < cut < START
    assert adm.limit == cut
    window(adm, clock, took_s=0.02, refused=True)
    assert adm.limit == max(FLOOR, int(cut * 10 / 20))
    window(adm, clock, took_s=1.0, refused=True)
    assert adm.limit == FLOOR
    assert adm.metrics.admission_limit._value.get() == FLOOR  # exported


def test_slow_without_refusals_leaves_the_limit_alone() -> None:
    # Slow answers at a load the limit does not reach: refusing would not speed them up.
    adm, clock = admission()
    for _ in range(5):
        window(adm, clock, took_s=1.0, refused=False)
    assert adm.limit == START


def test_refusing_within_the_target_grows_by_half_up_to_the_ceiling() -> None:
    adm, clock = admission(ceiling=40)
    window(adm, clock, took_s=0.001, refused=True)
    assert adm.limit == START + START // 2
    for _ in range(5):
        window(adm, clock, took_s=0.001, refused=True)
    assert adm.limit == 40


def test_unpressed_it_drifts_back_to_the_start_but_not_above() -> None:
    adm, clock = admission()
    window(adm, clock, took_s=1.0, refused=True)
    low = adm.limit
    assert low < START
    window(adm, clock, took_s=0.001, refused=False)
    assert adm.limit == low + 1
    for _ in range(3 * START):
        window(adm, clock, took_s=0.001, refused=False)
    assert adm.limit == START


def test_a_refusing_window_closes_early_after_a_few_slow_answers() -> None:
    """The onset of an overload: the clock has not moved, the first answers are slow."""
    adm, _ = admission(target_ms=10)
    assert not adm.admits(adm.limit)
    for _ in range(EARLY_SLOW - 1):
        adm.observe(0.05)
    assert adm.limit == START  # still open
    adm.observe(0.05)
    assert adm.limit == max(FLOOR, int(START * 10 / 50))

    unrefused, _ = admission(target_ms=10)  # slow but not refusing: the window runs its time
    for _ in range(3 * EARLY_SLOW):
        unrefused.observe(0.05)
    assert unrefused.limit == START


def test_time_waiting_on_redis_is_left_out() -> None:
    adm, clock = admission(target_ms=10)

    def request() -> None:  # 40 ms in the process, 38 of them waiting on Redis
        visit = adm.enter()
        clock.now += 0.038
        waited_on_redis(0.038)
        clock.now += 0.002
        adm.leave(visit)

    assert not adm.admits(START)
    for _ in range(3):  # each request in its own context, as each has its own task
        contextvars.copy_context().run(request)
    assert adm.limit > START  # refused, and the process itself answered in 2 ms: grows


def test_redis_time_counts_for_the_request_of_its_own_context_only() -> None:
    adm, _ = admission()
    visit = contextvars.copy_context().run(adm.enter)
    waited_on_redis(1.0)  # another context: start-up, the version watcher, another request
    assert visit.redis_s == 0.0


def test_target_zero_keeps_the_fixed_limit() -> None:
    adm, clock = admission(ceiling=16, target_ms=0)
    assert adm.limit == 16
    for _ in range(5):
        window(adm, clock, took_s=1.0, refused=True)
    assert adm.limit == 16


def test_no_ceiling_admits_everything() -> None:
    adm, _ = admission(ceiling=0)
    assert adm.admits(10_000)


def test_the_target_follows_a_slower_unloaded_time() -> None:
    """On a machine where an unloaded request takes as long as the setting allows, the limit
    must still be able to grow: a fixed target cuts it at every refusal."""
    fixed, fixed_clock = admission(target_ms=6)
    relative, clock = admission(target_ms=6, base_ratio=1.6)
    for adm, c in ((fixed, fixed_clock), (relative, clock)):
        window(adm, c, took_s=0.005, refused=False)  # unloaded: 5 ms
        window(adm, c, took_s=0.007, refused=True)  # pressed, at 7 ms
    assert relative.base_s == pytest.approx(0.005)
    assert relative.target_s == pytest.approx(0.008)
    assert relative.metrics.admission_target._value.get() == pytest.approx(0.008)
    assert relative.limit > START
    assert fixed.target_s == 0.006 and fixed.limit < START


def test_the_target_never_goes_below_the_setting() -> None:
    adm, clock = admission(target_ms=6, base_ratio=1.6)
    window(adm, clock, took_s=0.001, refused=False)
    assert adm.base_s == pytest.approx(0.001)
    assert adm.target_s == 0.006


def test_the_unloaded_time_is_a_minimum_that_forgets_slowly() -> None:
    adm, clock = admission(target_ms=1, base_ratio=2)
    window(adm, clock, took_s=0.005, refused=False)
    window(adm, clock, took_s=0.002, refused=False)
    assert adm.base_s == pytest.approx(0.002)  # a faster window: at once
    window(adm, clock, took_s=0.010, refused=False)
    assert adm.base_s == pytest.approx(0.002 * (1 + BASE_DRIFT))  # a slower one: 1% a window
    for _ in range(200):
        window(adm, clock, took_s=0.010, refused=False)
    assert adm.base_s == pytest.approx(0.010)  # slower for good: followed, in 16 s


def test_an_overload_does_not_teach_the_unloaded_time() -> None:
    adm, clock = admission(target_ms=1, base_ratio=2)
    window(adm, clock, took_s=0.004, refused=False)
    for _ in range(50):  # refusals all along, as at three times capacity
        for _ in range(20):
            assert not adm.admits(adm.limit)
            adm.observe(0.050)
        clock.now += WINDOW_S
    assert adm.base_s == pytest.approx(0.004)
    window(adm, clock, took_s=0.004, refused=False, n=BASE_SAMPLES - 2)  # too few to tell
    assert adm.base_s == pytest.approx(0.004)
