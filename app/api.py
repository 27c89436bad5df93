"""HTTP routes and the request middleware (request id, latency metrics).

No ``from __future__ import annotations`` here: FastAPI reads the route annotations at run
time, and the request body types are local to ``build_router``.
"""

import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.params import Depends as DependsParam
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import Unauthorized
from app.logs import REQUEST_ID
from app.metrics import Metrics
from app.schemas import (
    ErrorDetail,
    EventsResponse,
    Health,
    Readiness,
    RerankResponse,
    request_models,
)
from app.service import RerankService

# The access log: one line per request with its X-Request-ID (uvicorn's own is turned off).
access_log = logging.getLogger("app.access")

ROUTES = frozenset({"/rerank", "/events", "/healthz", "/readyz", "/metrics"})
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


def api_key_check(keys: Sequence[bytes]) -> DependsParam:
    """A dependency that lets a request through only with one of ``keys``.

    The key comes in ``X-API-Key`` or ``Authorization: Bearer``; every configured key is
    compared in constant time (``hmac.compare_digest``), all of them, so the time taken does
    not tell which key came close. The key is never logged nor echoed.
    """
    header = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer = HTTPBearer(auto_error=False)

    async def check(
        api_key: Annotated[str | None, Depends(header)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = api_key if api_key is not None else (credentials and credentials.credentials)
        if not given:
            raise Unauthorized("no API key")
        raw = given.encode("utf-8", "surrogateescape")
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(raw, key)
        if not matched:
            raise Unauthorized("wrong API key")

    return Depends(check)


def _documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route may give besides 422."""
    text = {
        400: "The body is not valid JSON.",
        401: "No API key, or a wrong one (only when API keys are configured).",
        413: "The request body is larger than max_body_bytes.",
        503: "Overloaded (with Retry-After), Redis unavailable for a write, or not ready.",
    }
    return {code: {"model": ErrorDetail, "description": text[code]} for code in codes}


def build_router(settings: Settings) -> APIRouter:
    """The routes, with request models that carry this app's limits."""
    LimitedRerankRequest, LimitedEventsRequest = request_models(settings)
    router = APIRouter()
    keys = [k.get_secret_value().encode() for k in settings.api_keys]
    work: list[DependsParam] = [api_key_check(keys)] if keys else []
    ops = work if settings.protect_ops else []
    work_errors = _documented(400, *((401,) if keys else ()), 413, 503)
    ops_errors = _documented(401) if ops else {}

    # The body types are built from the settings at run time, which mypy cannot follow.
    # response_model documents the answer; the route returns it already serialised (see
    # RerankAnswer in app/schemas.py), so FastAPI neither validates nor re-encodes it.
    # The work routes take the Request and read the service from it directly: resolving a
    # dependency for that was a measurable share of FastAPI's time per request.
    @router.post("/rerank", dependencies=work, responses=work_errors, response_model=RerankResponse)
    async def rerank(body: LimitedRerankRequest, request: Request) -> Response:  # type: ignore[valid-type]
        """Reorder the candidates for the user; top k, missing ones last."""
        answer = await _service(request).rerank(body)
        return Response(orjson.dumps(answer), media_type="application/json")

    @router.post("/events", dependencies=work, responses=work_errors)
    async def events(body: LimitedEventsRequest, request: Request) -> EventsResponse:  # type: ignore[valid-type]
        """Append items to the user's history (oldest first in the list)."""
        return await _service(request).events(body)

    @router.get("/healthz", dependencies=ops, responses=ops_errors)
    async def healthz() -> Health:
        """The process is alive."""
        return Health(status="ok")

    @router.get(
        "/readyz",
        dependencies=ops,
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
        dependencies=ops,
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
    """Pure ASGI middleware: X-Request-ID in and out, latency by route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            took = time.perf_counter() - start
            path = scope["path"]
            route = path if path in ROUTES else "other"  # bounded label values
            self.metrics.latency.labels(route, str(status)).observe(took)
            access_log.info(
                "%s %s %d %.1fms",
                scope["method"],
                path,
                status,
                took * 1000,
                extra={"request_id": request_id},
            )
            REQUEST_ID.reset(token)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID_PATTERN.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex
