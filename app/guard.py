"""Admission at the door (the in-flight limit) and the body size limit, before any parsing.

Two pure ASGI middlewares:

- ``Door`` sits outside every other layer, FastAPI's own included (``factory.RerankApp``
  puts it there): under overload it refuses a thousand requests a second or more, on the
  same event loop that serves the accepted ones, so a refusal must cost next to nothing. Past
  the limit that ``app.admission`` sets, a work request (/rerank, /events) gets a 503 with
  Retry-After, rendered once at start-up, without its body being read. Refusals are counted
  (``rerank_shed_total``) and logged once a second in sum, not one line each: a log line per
  refusal would be the overload's own amplifier (nor do refusals carry an X-Request-ID: the
  request context is inside the door). Health, readiness and metrics are never refused.
- ``BodyLimit`` answers 413 as soon as a body's Content-Length, or the bytes read so far,
  pass ``max_body_bytes``; it sits inside the request context, so those answers are logged.
"""

from __future__ import annotations

import logging
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.admission import Admission
from app.metrics import Metrics

log = logging.getLogger(__name__)

WORK_ROUTES = frozenset({"/rerank", "/events"})
REFUSALS_LOG_S = 1.0  # at most one summary line of refusals this often


class Door:
    def __init__(
        self, app: ASGIApp, admission: Admission, retry_after_s: int, metrics: Metrics
    ) -> None:
        self.app = app
        self.admission = admission
        self.metrics = metrics
        self.inflight = 0
        self._refusal = _response(
            503,
            "overloaded: too many requests in flight, retry later",
            [(b"retry-after", str(retry_after_s).encode())],
        )
        self._refused = 0
        self._logged_at = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in WORK_ROUTES:
            await self.app(scope, receive, send)
            return
        if not self.admission.admits(self.inflight):
            await self._refuse(send)
            return
        self.inflight += 1
        visit = self.admission.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            self.admission.leave(visit)

    async def _refuse(self, send: Send) -> None:
        self.metrics.shed.inc()
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSALS_LOG_S:
            log.warning(
                "overloaded: refused %d requests in the last %.1f s (in-flight limit %d)",
                self._refused,
                now - self._logged_at,
                self.admission.limit,
            )
            self._refused, self._logged_at = 0, now
        await _send(send, self._refusal)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._too_large = _response(
            413, f"request body larger than {max_body_bytes} bytes", [(b"connection", b"close")]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body up to the limit, then hand it on; 413 past the limit."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send(send, self._too_large)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # The routes read the whole body anyway (JSON): buffering it here costs nothing more
        # and catches chunked bodies, which carry no Content-Length.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await _send(send, self._too_large)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return whole
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _response(
    status: int, detail: str, headers: list[tuple[bytes, bytes]]
) -> tuple[Message, Message]:
    """The two ASGI messages of a JSON error answer ``{"detail": ...}``, rendered once."""
    body = orjson.dumps({"detail": detail})
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }
    return start, {"type": "http.response.body", "body": body}


async def _send(send: Send, response: tuple[Message, Message]) -> None:
    start, body = response
    await send(start)
    await send(body)
