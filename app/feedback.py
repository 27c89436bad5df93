"""Online feedback: which version's answers users take, counted from /events.

Each non-degraded /rerank answer's top k (``feedback_top_k``) is remembered for its user in
``rr:imp:<user>``: a hash of item id -> "<position> <version>", replaced by the user's next
answer and expiring ``feedback_ttl_s`` after it. An /events call reads that hash for its
items in the same round trip as the history append (app/store.py); the best (lowest)
position found there is a hit for the version that showed it. The remembered answer is then
consumed, so an answer counts at most one hit, at the position of the first item taken.

Writes stay off the request path: ``remember`` and ``found`` only queue, and one task sends
what queued up meanwhile as one pipeline, hits first (they refer to answers already stored),
then answers. A write that fails is counted (``rerank_online_write_failures_total{op}``) and
logged at most once per ``LOG_EVERY_S``; it never changes an answer. The queue is bounded:
past ``MAX_PENDING`` an entry is dropped and counted (``op="full"``).

Counts go to Prometheus (``rerank_online_impressions_total{version}``,
``rerank_online_hits_total{version,position}``) and to Redis, ``rr:ab:<version>``
(impressions, hits, hits:<bucket>, rr and rr2: the sums of the reciprocal rank and of its
square), which ``rerank split --report`` reads. The statistics below are its arithmetic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from app.background import stop_loop
from app.errors import StoreUnavailable
from app.metrics import Metrics
from app.store import POSITION_BUCKETS, Hit, Remembered, Store, position_bucket

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PENDING = 10_000  # answers (and hits) waiting to be written; past it they are dropped
BATCH = 500  # entries per pipeline
WRITE_TIMEOUT_S = 1.0  # a background write is no request: it may take longer than one
LOG_EVERY_S = 10.0
Z95 = 1.959963984540054  # the two-sided 95% quantile of the normal distribution
ALPHA = 0.05
MIN_IMPRESSIONS = 30  # fewer in an arm: the normal approximations do not hold, no test


def best_hit(user_id: str, remembered: Sequence[bytes | None]) -> Hit | None:
    """The lowest position among the remembered entries found (None: no hit)."""
    best: Hit | None = None
    for raw in remembered:
        if raw is None:
            continue
        position_text, _, version = raw.decode("utf-8", "replace").partition(" ")
        if not position_text.isdigit() or not version:
            continue  # a value this code did not write
        position = int(position_text)
        if position >= 1 and (best is None or position < best.position):
            best = Hit(user_id, version, position)
    return best


@dataclass(eq=False)
class Feedback:
    """Queues remembered answers and hits; one task writes them to Redis in batches."""

    store: Store
    metrics: Metrics
    top_k: int
    ttl_s: int
    max_pending: int = MAX_PENDING
    timeout_s: float = WRITE_TIMEOUT_S
    _answers: deque[Remembered] = field(default_factory=deque, init=False)
    _hits: deque[Hit] = field(default_factory=deque, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _logged_at: float = field(default=-math.inf, init=False)
    _unlogged: int = field(default=0, init=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="feedback-writer")

    async def close(self) -> None:
        """Write what is queued (bounded by the write timeout), then stop."""
        await stop_loop(self._task)
        with contextlib.suppress(Exception):
            await self._flush()

    @property
    def pending(self) -> int:
        return len(self._answers) + len(self._hits)

    def remember(self, user_id: str, version: str, item_ids: Sequence[str]) -> None:
        """Queue an answer's top ``top_k`` items (best first) for the user."""
        if not item_ids:
            return
        if len(self._answers) >= self.max_pending:
            self.metrics.online_write_failures.labels("full").inc()
            return
        self._answers.append(Remembered(user_id, version, tuple(item_ids[: self.top_k])))
        self._wake.set()

    def found(self, user_id: str, remembered: Sequence[bytes | None]) -> None:
        """Queue the hit among an /events call's remembered entries, if there is one."""
        hit = best_hit(user_id, remembered)
        if hit is None:
            return
        if len(self._hits) >= self.max_pending:
            self.metrics.online_write_failures.labels("full").inc()
            return
        self._hits.append(hit)
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except Exception:  # the writer must outlive any one bad batch
                log.exception("online feedback: a write failed unexpectedly")

    async def _flush(self) -> None:
        while self._hits or self._answers:
            hits = _take(self._hits, BATCH)
            if hits:
                await self._count_hits(hits)
            answers = _take(self._answers, BATCH)
            if answers:
                await self._remember(answers)

    async def _count_hits(self, hits: list[Hit]) -> None:
        try:
            counted = await self.store.count_hits(hits, self.timeout_s)
        except StoreUnavailable as exc:
            self._failed("hits", len(hits), exc)
            return
        for hit in counted:
            self.metrics.online_hits.labels(hit.version, position_bucket(hit.position)).inc()

    async def _remember(self, answers: list[Remembered]) -> None:
        try:
            await self.store.remember_answers(answers, self.ttl_s, self.timeout_s)
        except StoreUnavailable as exc:
            self._failed("remember", len(answers), exc)
            return
        per_version: dict[str, int] = {}
        for answer in answers:
            per_version[answer.version] = per_version.get(answer.version, 0) + 1
        for version, count in per_version.items():
            self.metrics.online_impressions.labels(version).inc(count)

    def _failed(self, op: str, count: int, exc: Exception) -> None:
        self.metrics.online_write_failures.labels(op).inc(count)
        self._unlogged += count
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning(
                "online feedback: %d writes lost since the last report (%s): %s",
                self._unlogged,
                op,
                exc,
            )
            self._logged_at, self._unlogged = now, 0


def _take(queue: deque[T], most: int) -> list[T]:
    out: list[T] = []
    while queue and len(out) < most:
        out.append(queue.popleft())
    return out


# --- the report's arithmetic ------------------------------------------------------------


@dataclass(frozen=True)
class ArmStats:
    """One version's online counts (``rr:ab:<version>``)."""

    version: str
    impressions: int = 0
    hits: int = 0
    rr: float = 0.0  # sum over impressions of 1 / position of the hit (0 without one)
    rr2: float = 0.0  # sum of its squares
    by_position: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, version: str, data: Mapping[bytes | str, bytes | str]) -> ArmStats:
        text = {_str(k): _str(v) for k, v in data.items()}
        return cls(
            version,
            int(text.get("impressions", 0)),
            int(text.get("hits", 0)),
            float(text.get("rr", 0.0)),
            float(text.get("rr2", 0.0)),
            {b: int(text.get(f"hits:{b}", 0)) for b, _, _ in POSITION_BUCKETS},
        )

    @property
    def hit_rate(self) -> float:
        return self.hits / self.impressions if self.impressions else 0.0

    @property
    def mrr(self) -> float:
        return self.rr / self.impressions if self.impressions else 0.0

    def hit_rate_ci(self) -> tuple[float, float]:
        """Wilson score interval, 95%: good near 0 and 1 and for small counts."""
        n = self.impressions
        if not n:
            return (0.0, 1.0)
        p = self.hit_rate
        z2 = Z95 * Z95
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return (max(0.0, centre - half), min(1.0, centre + half))

    def mrr_variance(self) -> float:
        """Sample variance of the per-impression reciprocal rank."""
        n = self.impressions
        if n < 2:
            return 0.0
        return max(0.0, (self.rr2 - self.rr * self.rr / n) / (n - 1))

    def mrr_ci(self) -> tuple[float, float]:
        """Normal interval, 95%, of the mean reciprocal rank."""
        n = self.impressions
        if not n:
            return (0.0, 1.0)
        half = Z95 * math.sqrt(self.mrr_variance() / n)
        return (max(0.0, self.mrr - half), min(1.0, self.mrr + half))


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def p_value(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return math.erfc(abs(z) / math.sqrt(2))


def hit_rate_z(a: ArmStats, b: ArmStats) -> float:
    """Two-proportion z statistic (pooled) of b's hit rate against a's."""
    n1, n2 = a.impressions, b.impressions
    if not n1 or not n2:
        return 0.0
    pooled = (a.hits + b.hits) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return (b.hit_rate - a.hit_rate) / se if se else 0.0


def mrr_z(a: ArmStats, b: ArmStats) -> float:
    """Welch z statistic of b's MRR against a's (normal approximation)."""
    if not a.impressions or not b.impressions:
        return 0.0
    se = math.sqrt(a.mrr_variance() / a.impressions + b.mrr_variance() / b.impressions)
    return (b.mrr - a.mrr) / se if se else 0.0


@dataclass(frozen=True)
class Comparison:
    control: str
    version: str
    hit_rate_diff: float
    hit_rate_p: float
    mrr_diff: float
    mrr_p: float
    tested: bool  # both arms have MIN_IMPRESSIONS

    @property
    def significant(self) -> bool:
        return self.tested and min(self.hit_rate_p, self.mrr_p) < ALPHA


def compare(control: ArmStats, other: ArmStats) -> Comparison:
    tested = min(control.impressions, other.impressions) >= MIN_IMPRESSIONS
    return Comparison(
        control.version,
        other.version,
        other.hit_rate - control.hit_rate,
        p_value(hit_rate_z(control, other)),
        other.mrr - control.mrr,
        p_value(mrr_z(control, other)),
        tested,
    )


def report(arms: Sequence[ArmStats], k: int) -> str:
    """The text of ``rerank split --report``: one line per version, then each version
    against the first (the control)."""
    lines = [
        f"{'version':<32} {'impressions':>11} {'hits':>7} "
        f"{f'hit rate@{k} [95% CI]':<26} {'MRR [95% CI]':<26} hits by position",
    ]
    for arm in arms:
        lo, hi = arm.hit_rate_ci()
        mlo, mhi = arm.mrr_ci()
        positions = " ".join(f"{b}:{n}" for b, n in arm.by_position.items())
        lines.append(
            f"{arm.version:<32} {arm.impressions:>11} {arm.hits:>7} "
            f"{f'{arm.hit_rate:.4f} [{lo:.4f}, {hi:.4f}]':<26} "
            f"{f'{arm.mrr:.4f} [{mlo:.4f}, {mhi:.4f}]':<26} {positions}"
        )
    if len(arms) < 2:
        lines.append("one version: nothing to compare")
        return "\n".join(lines)
    control = arms[0]
    for arm in arms[1:]:
        c = compare(control, arm)
        head = f"{arm.version} vs {control.version}:"
        if not c.tested:
            lines.append(
                f"{head} too few impressions to test (at least {MIN_IMPRESSIONS} per version)"
            )
            continue
        verdict = "SIGNIFICANT difference" if c.significant else "no significant difference"
        lines.append(
            f"{head} hit rate {c.hit_rate_diff:+.4f} (two-proportion z-test p={c.hit_rate_p:.3f}),"
            f" MRR {c.mrr_diff:+.4f} (Welch z-test p={c.mrr_p:.3f}): {verdict} at {ALPHA:g}"
        )
    return "\n".join(lines)
