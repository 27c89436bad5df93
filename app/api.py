"""HTTP routes and the request middleware (request id, latency metrics).

No ``from __future__ import annotations`` here: FastAPI reads the route annotations at run
time, and the request body types are local to ``build_router``.
"""

import logging
import os
import re
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.body import JsonRoute
from app.config import Settings
from app.context import CURRENT, Call
from app.items import ItemsService, NewItem
from app.logs import REQUEST_ID
from app.metrics import Metrics
from app.schemas import (
    ErrorDetail,
    EventsResponse,
    Health,
    ItemsResponse,
    Readiness,
    RerankResponse,
    items_request_model,
    request_models,
)
from app.service import RerankService

# The access log: one line per request with its X-Request-ID (uvicorn's own is turned off).
access_log = logging.getLogger("app.access")

ROUTES = frozenset({"/rerank", "/events", "/items", "/healthz", "/readyz", "/metrics"})
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first
# A caller's id is echoed into headers and logs: accept only short, plain tokens.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


# Dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in its threadpool,
# a thread hop per request for what is one attribute read.
def _service(request: Request) -> RerankService:
    service: RerankService = request.app.state.service
    return service


async def get_service(request: Request) -> RerankService:
    return _service(request)


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


ServiceDep = Annotated[RerankService, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying (retry_after_s).",
        "schema": {"type": "integer"},
    }
}


def _documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route may give besides 422."""
    text = {
        401: "No API key, or a wrong one (only when API keys are configured).",
        408: "The request body did not arrive within body_timeout_s.",
        413: "The request body is larger than max_body_bytes.",
        409: "No live model version has an item tower, so none can add items.",
        415: "The body is not sent with Content-Type: application/json.",
        503: "Overloaded, or Redis could not serve a write; retry after Retry-After seconds.",
    }
    entries: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entries[code] = {"model": ErrorDetail, "description": text[code]}
        if code == 503:
            entries[code]["headers"] = RETRY_AFTER_HEADER
    return entries


def build_router(settings: Settings) -> APIRouter:
    """The routes, with request models that carry this app's limits."""
    LimitedRerankRequest, LimitedEventsRequest = request_models(settings)
    router = APIRouter(route_class=JsonRoute)
    # The API key is checked before the body is read, in app/guard.py; declared here.
    keys = bool(settings.api_keys)
    work_errors = _documented(*((401,) if keys else ()), 408, 413, 415, 503)
    ops_errors = _documented(401) if keys and settings.protect_ops else {}

    # The body types are built from the settings at run time, which mypy cannot follow.
    # response_model documents the answer; the route returns it already serialised (see
    # RerankAnswer in app/schemas.py), so FastAPI neither validates nor re-encodes it.
    # The work routes take the Request and read the service from it directly: resolving a
    # dependency for that was a measurable share of FastAPI's time per request.
    @router.post("/rerank", responses=work_errors, response_model=RerankResponse)
    async def rerank(body: LimitedRerankRequest, request: Request) -> Response:  # type: ignore[valid-type]
        """Reorder the candidates for the user; top k, missing ones last."""
        answer = await _service(request).rerank(body)
        return Response(orjson.dumps(answer), media_type="application/json")

    @router.post("/events", responses=work_errors)
    async def events(body: LimitedEventsRequest, request: Request) -> EventsResponse:  # type: ignore[valid-type]
        """Append items to the user's history (oldest first in the list)."""
        return await _service(request).events(body)

    LimitedItemsRequest = items_request_model(settings)
    items_errors = _documented(*((401,) if keys else ()), 408, 409, 413, 415, 503)

    @router.post("/items", responses=items_errors)
    async def items(body: LimitedItemsRequest, request: Request) -> ItemsResponse:  # type: ignore[valid-type]
        """Add items after training: each item's vector from its text and attributes, under
        every live version; an existing vector is never replaced."""
        service: ItemsService = request.app.state.items
        new = [NewItem(i.item_id, i.text, dict(i.attributes)) for i in body.items]  # type: ignore[attr-defined]
        done = await service.add(new)
        return ItemsResponse(
            added=done.added,
            existing=done.existing,
            versions=done.versions,
            ignored_attributes=done.ignored_attributes,
        )

    @router.get("/healthz", responses=ops_errors)
    async def healthz() -> Health:
        """The process is alive."""
        return Health(status="ok")

    @router.get(
        "/readyz",
        responses={**ops_errors, 503: {"model": Readiness, "description": "Not ready."}},
    )
    async def readyz(request: Request, service: ServiceDep, response: Response) -> Readiness:
        """Redis answers, a model is loaded and its vectors are in Redis; not shutting down."""
        ready = await service.readiness()
        if request.app.state.drain.draining:
            ready = ready.model_copy(update={"ready": False, "draining": True})
        if not ready.ready:
            response.status_code = 503
        return ready

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            **ops_errors,
            200: {
                "description": "Prometheus text format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        },
    )
    async def metrics(metrics: MetricsDep) -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


class RequestContext:
    """Pure ASGI middleware, outermost: X-Request-ID in and out, latency by route and status,
    one access-log line per request.

    A client that hangs up before its answer has started is logged and counted as 499 (as
    nginx does), not as a server error. Requests refused for overload are counted like the
    others but not logged one by one: the admission gate logs them in sum (app/guard.py).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Children bound once per (route, status): under overload this runs thousands of
        # times a second, and ``labels()`` is a locked lookup each time.
        self._latency: dict[tuple[str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        call = Call()
        call_token = CURRENT.set(call)
        status = 0  # no answer started yet
        hung_up = False
        start = time.perf_counter()

        async def receive_watched() -> Message:
            nonlocal hung_up
            message = await receive()
            if message["type"] == "http.disconnect":
                hung_up = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive_watched, send_with_id)
        finally:
            took = time.perf_counter() - start
            if status == 0:  # nothing sent: the client left first, else the server failed
                status = CLIENT_CLOSED if hung_up else 500
            path = scope["path"]
            route = path if path in ROUTES else "other"  # bounded label values
            self._histogram(route, status).observe(took)
            if not call.refused:
                access_log.info(
                    "%s %s %d %.1fms%s",
                    scope["method"],
                    path,
                    status,
                    took * 1000,
                    "" if call.model_version is None else f" model={call.model_version}",
                    extra={"request_id": request_id},
                )
            CURRENT.reset(call_token)
            REQUEST_ID.reset(token)

    def _histogram(self, route: str, status: int) -> Histogram:
        child = self._latency.get((route, status))
        if child is None:
            child = self._latency[route, status] = self.metrics.latency.labels(route, str(status))
        return child


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID_PATTERN.fullmatch(text):
                return text
            break
    return os.urandom(16).hex()  # a fresh id: 128 random bits as 32 hex digits
