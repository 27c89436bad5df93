"""Admission at the door: the in-flight limit and the body size limit, before any parsing.

A pure ASGI middleware, so that a request the service will refuse costs as little as
possible: an overloaded process (past the limit that ``app.admission`` sets) answers 503
(with Retry-After) without reading the body, and a body larger than ``max_body_bytes`` gets
413 as soon as its Content-Length, or the bytes read so far, pass the limit. Only the work
routes (/rerank, /events) count against the in-flight limit; health, readiness and metrics
stay answerable under overload.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.admission import Admission
from app.metrics import Metrics

WORK_ROUTES = frozenset({"/rerank", "/events"})


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        admission: Admission,
        retry_after_s: int,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        work = scope["path"] in WORK_ROUTES
        if work and not self.admission.admits(self.inflight):
            self.metrics.shed.inc()
            await _reply(
                send,
                503,
                "overloaded: too many requests in flight, retry later",
                [(b"retry-after", str(self.retry_after_s).encode())],
            )
            return
        if work:
            self.inflight += 1
        try:
            await self._bounded(scope, receive, send)
        finally:
            if work:
                self.inflight -= 1

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body up to the limit, then hand it on; 413 past the limit."""
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(send)
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
                await self._too_large(send)
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

    async def _too_large(self, send: Send) -> None:
        await _reply(
            send,
            413,
            f"request body larger than {self.max_body_bytes} bytes",
            [(b"connection", b"close")],
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reply(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
