"""The service's front: the API key, the request body and admission, before any parsing.

Two pure ASGI middlewares, between the request context (app/api.py, outermost: request id,
access log, latency) and FastAPI's own stack (``factory.RerankApp`` puts them there), so a
request they answer costs a few calls, not a pass through every layer:

- ``ApiKeyCheck`` answers 401 from the headers alone, before a byte of the body is read:
  a caller without a key can neither hold the process waiting on a body nor learn anything
  from validation. Every configured key is compared in constant time
  (``hmac.compare_digest``), all of them, so the time taken does not tell which key came
  close; the key is never logged nor echoed.
- ``AdmissionGate`` takes a work request (/rerank, /events, /items) in two steps. First its body is
  read whole, under ``body_timeout_s`` (408 and close past it) and ``max_body_bytes`` (413
  and close past it), holding nothing but the connection: time spent waiting on a slow
  client is never the process's. Then the request asks ``app.admission`` for a slot and
  runs in it, or gets the one overload answer, a 503 with Retry-After rendered once at
  start-up; when the waiting line is already full, before its body is read. Every refusal
  is sent at the request's deadline (``admission.timeout_s`` after it arrived), never at
  once: a refusal that costs the caller nothing brings a caller that ignores Retry-After
  straight back, and with more such callers than the line holds their refusals take the
  CPU from the requests being served. Holding one costs a timer and its connection.
  Refusals are counted (``rerank_shed_total``, and in ``rerank_request_seconds`` with status
  503) and logged once a second in sum, not one line each: a log line per refusal would be
  the overload's own amplifier.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Sequence

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.admission import Admission
from app.context import CURRENT
from app.metrics import Metrics

log = logging.getLogger(__name__)

WORK_ROUTES = frozenset({"/rerank", "/events", "/items"})
OPS_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
REFUSALS_LOG_S = 1.0  # at most one summary line of refusals this often

Response = tuple[Message, Message]


class ApiKeyCheck:
    def __init__(self, app: ASGIApp, keys: Sequence[bytes], paths: frozenset[str]) -> None:
        self.app = app
        self.keys = list(keys)
        self.paths = paths  # the routes that need a key
        self._unauthorized = _response(
            401,
            "unauthorized: send a valid API key in X-API-Key or Authorization",
            [(b"www-authenticate", b'Bearer realm="rerank"')],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths and not self._known(scope):
            await _send(send, self._unauthorized)
            return
        await self.app(scope, receive, send)

    def _known(self, scope: Scope) -> bool:
        given = _api_key(scope["headers"])
        if not given:
            return False
        matched = False
        for key in self.keys:  # all of them: the time does not depend on which one matched
            matched |= hmac.compare_digest(given, key)
        return matched


def _api_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key in ``X-API-Key``, else in ``Authorization: Bearer <key>``."""
    bearer = None
    for name, value in headers:
        if name == b"x-api-key" and value:
            return value
        if name == b"authorization" and bearer is None:
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer" and credentials:
                bearer = credentials
    return bearer


class AdmissionGate:
    def __init__(
        self,
        app: ASGIApp,
        admission: Admission,
        max_body_bytes: int,
        body_timeout_s: float,
        retry_after_s: int,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.metrics = metrics
        self._refusal = _response(
            503,
            "overloaded: retry later",
            [(b"retry-after", str(retry_after_s).encode())],
        )
        close = [(b"connection", b"close")]
        self._too_large = _response(413, f"request body larger than {max_body_bytes} bytes", close)
        self._too_slow = _response(
            408, f"request body not received within {body_timeout_s:g} s", close
        )
        self._refused = 0
        self._logged_at = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in WORK_ROUTES:
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        if self.admission.full():  # refused: not worth reading the body
            await self._refuse(send, arrived)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send(send, self._too_large)
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._read_body(receive)
        except TimeoutError:
            await _send(send, self._too_slow)
            return
        except BodyTooLarge:
            await _send(send, self._too_large)
            return
        if body is None:  # the client hung up mid-body: nothing to answer (logged as 499)
            return
        ticket = await self.admission.enter()
        if ticket is None:
            await self._refuse(send, arrived)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        try:
            await self.app(scope, replay, send)
        finally:
            self.admission.leave(ticket)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Send, arrived: float) -> None:
        """The overload answer, sent at the request's deadline: a waiter that timed out
        reaches it there already; one refused on arrival waits for it here."""
        self.metrics.shed.inc()
        call = CURRENT.get()
        if call is not None:
            call.refused = True
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSALS_LOG_S:
            log.warning(
                "overloaded: refused %d requests in the last %.1f s (%d in flight, %d waiting)",
                self._refused,
                now - self._logged_at,
                self.admission.inflight,
                self.admission.waiting,
            )
            self._refused, self._logged_at = 0, now
        hold = arrived + self.admission.timeout_s - time.monotonic()
        if hold > 0:
            await asyncio.sleep(hold)
        await _send(send, self._refusal)


class BodyTooLarge(Exception):
    """A body without Content-Length grew past max_body_bytes while it was read."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _response(status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> Response:
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


async def _send(send: Send, response: Response) -> None:
    start, body = response
    await send(start)
    await send(body)
