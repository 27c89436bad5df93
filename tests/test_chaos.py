"""The fault-injection scenarios of loadtest.chaos, short, against a real service process.

Each asserts the guarantees only, never timings: no answer other than a normal 200, a
degraded 200 or a 503 with Retry-After; the fault was seen; the service recovers by itself.
The service is one process for the module (SIGTERM, which ends it, runs last).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from loadtest import chaos


@pytest.fixture(scope="module")
def env() -> Iterator[chaos.Target]:
    saved = {k: getattr(chaos, k) for k in ("BEFORE_S", "AFTER_S", "STEADY_RATE", "N_ITEMS")}
    saved.update(CAPACITY_S=chaos.CAPACITY_S, SHUTDOWN_DELAY_S=chaos.SHUTDOWN_DELAY_S)
    chaos.BEFORE_S, chaos.AFTER_S, chaos.STEADY_RATE, chaos.N_ITEMS = 0.3, 1.5, 100.0, 300
    chaos.CAPACITY_S, chaos.SHUTDOWN_DELAY_S = 1.0, 0.5
    try:
        with chaos.environment() as e:
            yield e
    finally:
        for name, value in saved.items():
            setattr(chaos, name, value)


def no_errors(report: chaos.Report) -> None:
    assert report.errors == 0, report.error_samples
    assert report.sent > 0 and report.refused == 0


@pytest.mark.parametrize("fault", ["redis_paused", "redis_slowed", "redis_killed"])
def test_redis_fault_fails_open_and_recovers(env: chaos.Target, fault: str) -> None:
    report = asyncio.run(chaos.redis_fault(env, fault, fault_s=1.0))
    no_errors(report)
    assert report.degraded > 0  # the fault was seen, and answered in the caller's order
    assert report.recovery_s is not None  # normal answers again, with no restart


def test_redis_full_load_fails_and_the_old_version_stays(env: chaos.Target) -> None:
    report = asyncio.run(chaos.redis_full(env))
    no_errors(report)
    assert report.extra["load_exit_code"] == 1
    assert "maxmemory" in report.extra["load_message"]
    assert "unchanged (still chaos-a)" in report.extra["load_message"]
    assert report.extra["active_after"] == "chaos-a"
    assert report.extra["partial_vectors_left"] == 0
    assert report.normal > 0


def test_bad_model_or_vector_at_swap_keeps_the_old_model(env: chaos.Target) -> None:
    report = asyncio.run(chaos.bad_swap(env))
    no_errors(report)
    assert report.extra["served_version"] == "chaos-a"
    assert report.extra["swap_failures"] >= 2
    assert report.extra["corrupt_vector_is_missing"] is True


def test_overload_sheds_with_retry_after_and_serves_after(env: chaos.Target) -> None:
    report = asyncio.run(chaos.overload(env, seconds=3.0))
    no_errors(report)  # a 503 without Retry-After counts as an error
    assert report.shed > 0 and report.normal > 0
    assert report.extra["after_normal"] == report.extra["after_sent"] > 0


def test_closed_loop_overload_answers_without_errors(env: chaos.Target) -> None:
    report = asyncio.run(chaos.overload_closed_loop(env, seconds=2.0, connections=32))
    no_errors(report)  # a 503 without Retry-After counts as an error
    assert report.normal > 0
    assert report.extra["goodput_rps"] > 0


def test_sigterm_drains(env: chaos.Target) -> None:
    report = asyncio.run(chaos.sigterm(env))
    no_errors(report)  # every request sent before readiness turned false was answered
    extra = report.extra
    assert extra["readiness_false_after_s"] is not None  # /readyz said 503 before the exit
    assert extra["exit_code"] in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    assert extra["exit_after_s"] <= extra["exit_bound_s"] + 10  # bounded; slack for a busy CPU


def test_the_report_tells_unanswered_requests_never_written() -> None:
    import numpy as np

    from loadtest import load

    status = np.array([200, load.TIMEOUT, load.TIMEOUT, load.SHED], np.int32)
    run = load.Run(
        due=np.zeros(4), sent=np.array([0.1, 0.2, 0.0, 0.3]), done=np.ones(4), status=status,
        degraded=np.zeros(4, np.bool_), lag=np.zeros(4), window_s=1.0, cpu_s=0.0, peak_conns=1,
    )  # fmt: skip
    report = chaos.report("x", run)
    assert report.errors == 2  # both still count
    assert report.extra == {"unanswered_never_written": 1}
