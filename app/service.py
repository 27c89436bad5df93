"""One /rerank or /events call, from validated request to response.

The rules of docs/api.md live here: duplicates dropped (first kept), candidates without a
vector ranked last in the caller's order, fail open to the caller's order when Redis or the
model cannot answer, and the model pinned once per request so its vectors and its scores come
from the same version.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.batcher import Batcher
from app.context import CURRENT
from app.errors import ModelError, StoreUnavailable
from app.feedback import Feedback
from app.metrics import Metrics
from app.model import Job, LoadedModel, Scored
from app.schemas import (
    BecauseAnswer,
    EventsRequest,
    EventsResponse,
    RankedItemAnswer,
    Readiness,
    RerankAnswer,
    RerankRequest,
)
from app.store import Fetched, Store
from app.swap import ModelHolder

log = logging.getLogger(__name__)


def dedupe(ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def dedupe_features(
    ids: Sequence[str], features: list[dict[str, float]]
) -> tuple[list[str], list[dict[str, float]]]:
    """``dedupe`` of candidates that carry features: each kept id keeps its own."""
    first: dict[str, int] = {}
    for i, item in enumerate(ids):
        first.setdefault(item, i)
    return list(first), [features[i] for i in first.values()]


def unscored(item_id: str) -> RankedItemAnswer:
    return {"item_id": item_id, "score": None, "because": None}


def caller_order(user_id: str, candidates: list[str], k: int) -> RerankAnswer:
    """The fail-open answer: the caller's candidates, in the caller's order, unscored.

    ``model_version`` is null: no model scored these items.
    """
    items = [unscored(i) for i in candidates[:k]]
    return {
        "user_id": user_id,
        "model_version": None,
        "items": items,
        "missing": [],
        "degraded": True,
    }


def rank(
    candidates: list[str],
    fetched: Fetched,
    scored: Scored | None,
    k: int,
    explain_top: int | None,
) -> tuple[list[RankedItemAnswer], list[str]]:
    """Scored candidates by score (ties in the caller's order), then the missing ones."""
    present = fetched.cand_positions
    missing = [candidates[i] for i in fetched.missing_positions]
    items: list[RankedItemAnswer] = []
    if scored is not None:
        order = np.argsort(-scored.scores, kind="stable")[:k]
        scores = scored.scores[order].tolist()
        for row, score in zip(order.tolist(), scores, strict=True):
            because = None
            if explain_top is not None:
                because = explain(scored.attn[row], fetched.hist_ids, explain_top)
            item_id = candidates[present[row]]
            items.append({"item_id": item_id, "score": score, "because": because})
    items.extend(unscored(i) for i in missing[: k - len(items)])
    return items, missing


def explain(weights: np.ndarray, hist_ids: list[str], top: int) -> list[BecauseAnswer]:
    """The history items with the highest attention weight for one candidate."""
    if not hist_ids:
        return []
    order = np.argsort(-weights, kind="stable")[:top]
    return [{"item_id": hist_ids[i], "weight": float(weights[i])} for i in order.tolist()]


class RerankService:
    def __init__(
        self,
        store: Store,
        holder: ModelHolder,
        batcher: Batcher,
        metrics: Metrics,
        explain_top: int,
        default_history_len: int,
        feedback: Feedback | None = None,
    ) -> None:
        self.store = store
        self.holder = holder
        self.batcher = batcher
        self.metrics = metrics
        self.explain_top = explain_top
        self.default_history_len = default_history_len
        self.feedback = feedback  # None: answers are not remembered (feedback_top_k=0)
        # Counter children bound once per version: ``labels()`` is a locked lookup.
        self._answers: dict[str, Any] = {}

    async def rerank(self, req: RerankRequest) -> RerankAnswer:
        # Candidates given as {"id", "features"} objects carry their features alongside.
        given: list[dict[str, float]] | None = getattr(req.candidates, "features", None)
        if given is None:
            candidates = dedupe(req.candidates)
        else:
            candidates, given = dedupe_features(req.candidates, given)
        # Pinned: the user's arm of the split (else the active version); its vectors and its
        # scores come from this version.
        model = self.holder.pick(req.user_id)
        if model is None:
            self.metrics.degraded.labels("no_model").inc()
            return caller_order(req.user_id, candidates, req.k)
        try:
            fetched = await self.store.fetch(model.manifest, req.user_id, req.history, candidates)
        except StoreUnavailable as exc:
            log.warning("degraded answer for user %s (%s): %s", req.user_id, model.version, exc)
            self.metrics.degraded.labels("store").inc()
            return caller_order(req.user_id, candidates, req.k)
        self.metrics.missing_vectors.inc(len(fetched.missing_positions))
        try:
            scored = await self._score(model, fetched, given)
        except ModelError as exc:
            log.error("degraded answer for user %s (%s): %s", req.user_id, model.version, exc)
            self.metrics.degraded.labels("model").inc()
            return caller_order(req.user_id, candidates, req.k)
        items, missing = rank(
            candidates, fetched, scored, req.k, self.explain_top if req.explain else None
        )
        counter = self._answers.get(model.version)
        if counter is None:
            counter = self._answers[model.version] = self.metrics.answers.labels(model.version)
        counter.inc()
        call = CURRENT.get()
        if call is not None:
            call.model_version = model.version  # the access log line names it
        if self.feedback is not None:  # queued: written after the answer, off its path
            self.feedback.remember(req.user_id, model.version, [i["item_id"] for i in items])
        return {
            "user_id": req.user_id,
            "model_version": model.version,
            "items": items,
            "missing": missing,
            "degraded": False,
        }

    async def _score(
        self, model: LoadedModel, fetched: Fetched, given: list[dict[str, float]] | None
    ) -> Scored | None:
        if len(fetched.cand) == 0:  # nothing to score: every candidate is missing
            return None
        feats = None
        if given is not None:
            feats, unknown = model.features(given, fetched.cand_positions)
            if unknown:
                self.metrics.unknown_features.inc(unknown)
        # cand_rank is the position in the caller's deduplicated list, gaps included, so a
        # missing vector does not shift the recall-order signal of the ones after it.
        positions = fetched.cand_positions.astype(np.float32)
        return await self.batcher.submit(model, Job(fetched.hist, fetched.cand, positions, feats))

    async def events(self, req: EventsRequest) -> EventsResponse:
        # The longest history any live version reads: each arm of a split sees its own.
        live = self.holder.routing.live()
        keep = max(
            (s.model.manifest.history_len for s in live.values()),
            default=self.default_history_len,
        )
        length, remembered = await self.store.append_events(
            req.user_id, req.item_ids, keep, lookup=self.feedback is not None
        )
        if self.feedback is not None and remembered:
            self.feedback.found(req.user_id, remembered)
        return EventsResponse(user_id=req.user_id, history_length=length)

    async def readiness(self) -> Readiness:
        routing = self.holder.routing
        live = routing.live()
        try:
            redis = await self.store.ping()
            # Every live version's vectors: each arm of a split answers some users.
            vectors = bool(live) and await self.store.all_vectors_present(
                {version: serving.sample_ids for version, serving in live.items()}
            )
        except StoreUnavailable:
            redis = vectors = False
        version = routing.active_version
        if version is None and live:  # a split without an active version
            version = next(iter(live))
        return Readiness(
            ready=redis and vectors, redis=redis, model_version=version, vectors=vectors
        )
