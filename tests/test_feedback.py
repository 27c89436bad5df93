"""Online feedback's arithmetic: hits from remembered entries, intervals and tests; the
writer's batching."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import pytest

from app.feedback import (
    ArmStats,
    Feedback,
    best_hit,
    compare,
    hit_rate_z,
    mrr_z,
    p_value,
    report,
)
from app.metrics import Metrics
from app.store import Hit, Remembered, position_bucket


def test_remembered_entries_name_position_and_version() -> None:
    answer = Remembered("u", "v1", ("a", "b", "a", "c"))
    assert answer.entries() == {"a": "1 v1", "b": "2 v1", "c": "4 v1"}


def test_the_best_hit_is_the_lowest_position_found() -> None:
    found = [None, b"7 v2", b"3 v1", b"garbage", b"x v1", None]
    assert best_hit("u", found) == Hit("u", "v1", 3)
    assert best_hit("u", [None, b"nonsense"]) is None


@pytest.mark.parametrize(
    ("position", "bucket"),
    [(1, "1"), (2, "2-3"), (3, "2-3"), (4, "4-10"), (10, "4-10"), (11, "11+")],
)
def test_position_buckets(position: int, bucket: str) -> None:
    assert position_bucket(position) == bucket


def test_wilson_interval_matches_known_values() -> None:
    lo, hi = ArmStats("a", impressions=100, hits=50).hit_rate_ci()
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = ArmStats("a", impressions=10, hits=0).hit_rate_ci()
    assert lo == 0 and round(hi, 4) == 0.2775


def test_two_proportion_z_test() -> None:
    a = ArmStats("a", impressions=100, hits=45)
    b = ArmStats("b", impressions=100, hits=55)
    assert hit_rate_z(a, b) == pytest.approx(0.1 / math.sqrt(0.25 * 0.02))
    assert p_value(hit_rate_z(a, b)) == pytest.approx(0.1573, abs=1e-4)


def test_mrr_interval_and_z_test_from_sums() -> None:
    # 4 impressions with reciprocal ranks 1, 0.5, 0, 0: mean 0.375, sample variance 0.229.
    a = ArmStats("a", impressions=4, hits=2, rr=1.5, rr2=1.25)
    assert a.mrr == 0.375 and a.mrr_variance() == pytest.approx((1.25 - 1.5**2 / 4) / 3)
    lo, hi = a.mrr_ci()
    assert lo == pytest.approx(max(0.0, 0.375 - 1.959964 * math.sqrt(a.mrr_variance() / 4)))
    assert hi == pytest.approx(0.375 + 1.959964 * math.sqrt(a.mrr_variance() / 4))
    assert mrr_z(a, a) == 0


def test_report_says_whether_the_difference_is_significant() -> None:
    control = ArmStats("a", impressions=1000, hits=100, rr=60.0, rr2=45.0)
    same = ArmStats("b", impressions=1000, hits=104, rr=61.0, rr2=46.0)
    better = ArmStats("c", impressions=1000, hits=200, rr=150.0, rr2=120.0)
    assert not compare(control, same).significant and compare(control, better).significant
    text = report([control, same, better], 10)
    assert "b vs a:" in text and "no significant difference at 0.05" in text
    assert "c vs a:" in text and "SIGNIFICANT difference" in text
    assert "hit rate@10" in text
    few = report([control, ArmStats("d", impressions=5, hits=1)], 10)
    assert "too few impressions" in few


class _RecordingStore:
    """Keeps each remember_answers call's answers instead of writing them."""

    def __init__(self) -> None:
        self.calls: list[list[Remembered]] = []

    async def remember_answers(self, answers: Sequence[Remembered], *_: Any) -> None:
        self.calls.append(list(answers))


def test_answers_queued_while_the_writer_waits_share_one_pipeline() -> None:
    async def main() -> list[list[Remembered]]:
        store = _RecordingStore()
        feedback = Feedback(store, Metrics(), top_k=3, ttl_s=60, flush_after_s=0.5)  # type: ignore[arg-type]
        feedback.start()
        feedback.remember("u1", "v1", ["a", "b"])
        for _ in range(5):  # the writer wakes for the first answer and waits
            await asyncio.sleep(0)
        feedback.remember("u2", "v1", ["c"])
        while not store.calls:
            await asyncio.sleep(0.01)
        await feedback.close()
        return store.calls

    calls = asyncio.run(main())
    assert [[a.user_id for a in call] for call in calls] == [["u1", "u2"]]
