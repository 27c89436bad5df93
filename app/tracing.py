"""OpenTelemetry traces of the service's requests, exported over OTLP/HTTP when configured.

On when an OTLP endpoint is configured: ``RERANK_OTLP_ENDPOINT``, else the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``endpoint``);
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off again. Off,
``from_settings`` returns None: the SDK and the exporter are never imported, no middleware
is installed, and the store and the batcher skip their one ``tracing is not None`` check.

The spans of one request, in the caller's trace when it sends a W3C ``traceparent``::

    POST /rerank    SERVER  the request, body read and slot wait included (``TraceRequests``)
      redis fetch   CLIENT  each Redis round trip of the request (app/store.py)
      queue wait            from the request's submit to the start of its batch
      model run             the ONNX Runtime run of that batch (app/batcher.py)

One batcher loop and one thread serve every request, so no span is held open across its
awaits or threads: the batch's spans are recorded once the batch has run, with the start
and end times of the batch's own ``perf_counter`` stamps, each under the context that its
request captured when it queued. The request span takes its times from the same clock, so
parent and children always line up. /healthz, /readyz and /metrics are not traced: probes
and scrapes would outnumber the requests.

Only the OpenTelemetry API is imported at module level (FastAPI imports it anyway); the SDK
and the exporter (the ``tracing`` extra) load in ``Tracing`` when tracing is on.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.logs import REQUEST_ID

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
NAMED_ROUTES = frozenset({"/rerank", "/events"})  # other paths: the method alone (bounded)
TRACES_PATH = "/v1/traces"
SERVICE_NAME = "rerank"


class Queued(Protocol):
    """What the batcher keeps of one request: when it queued, and its trace context."""

    queued_at: float
    trace: Context | None


def endpoint(settings: Settings, environ: Mapping[str, str] = os.environ) -> str | None:
    """The OTLP/HTTP URL spans go to, or None when tracing is off.

    ``RERANK_OTLP_ENDPOINT`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` are the collector's base
    URL (``http://collector:4318``), to which ``/v1/traces`` is added;
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is the full URL, used as it is.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    base = settings.otlp_endpoint
    if not base:
        full = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if full:
            return full
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or None
    if not base:
        return None
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def _check_protocol(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip()
        if value and value != "http/protobuf":
            raise ValueError(
                f"{name}={value!r}: rerank exports traces over OTLP/HTTP only "
                "(http/protobuf, port 4318 by default)"
            )
        if value:
            return


def from_settings(settings: Settings, environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """Tracing to the configured OTLP endpoint, or None (nothing loaded) when there is none."""
    url = endpoint(settings, environ)
    if url is None:
        return None
    _check_protocol(environ)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise RuntimeError(
            f"an OTLP endpoint is configured ({url}) but the OpenTelemetry SDK or its OTLP "
            "exporter is missing: install the tracing extra (pip install 'rerank[tracing]')"
        ) from exc
    # Headers, timeout, compression and TLS come from the standard OTEL_EXPORTER_OTLP_*.
    return Tracing(OTLPSpanExporter(endpoint=url))


class Tracing:
    """A tracer provider of this app alone (never the global one: tests build many apps)."""

    def __init__(self, exporter: SpanExporter, batch: bool = True) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; the
        # sampler comes from OTEL_TRACES_SAMPLER (default: the caller's decision, else all).
        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME,
                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
                "process.pid": os.getpid(),
            }
        )
        self.provider = TracerProvider(resource=resource)
        # Batch: spans leave from a background thread, never from the event loop.
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("rerank")
        self.propagator = TraceContextTextMapPropagator()
        # Every span's times are perf_counter readings moved by one offset to the wall
        # clock, so a parent and its children always line up; perf_counter is slewed with
        # the wall clock, and only a step of the wall clock (rare once a host is up) moves
        # this process's spans off it, by that step.
        self.offset_ns = time.time_ns() - time.perf_counter_ns()

    def ns(self, perf_s: float) -> int:
        """A ``time.perf_counter`` reading as OpenTelemetry's nanoseconds since the epoch."""
        return round(perf_s * 1e9) + self.offset_ns

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread."""
        self.provider.shutdown()

    def extract(self, headers: Iterable[tuple[bytes, bytes]]) -> Context:
        """The caller's trace context from ``traceparent`` and ``tracestate`` (W3C)."""
        carrier: dict[str, str] = {}
        for name, value in headers:
            if name in (b"traceparent", b"tracestate"):
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        return self.propagator.extract(carrier) if carrier else Context()

    def current(self) -> Context | None:
        """The current context if a span in it is being recorded (sampled), else None."""
        ctx = otel_context.get_current()
        return ctx if trace.get_current_span(ctx).is_recording() else None

    def child(
        self,
        name: str,
        start: float,
        end: float,
        error: BaseException | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """A finished span under the current one, if that is recorded; times from
        ``time.perf_counter``."""
        if not trace.get_current_span().is_recording():
            return
        span = self.tracer.start_span(
            name, kind=SpanKind.CLIENT, start_time=self.ns(start), attributes=attributes
        )
        _fail(span, error)
        span.end(end_time=self.ns(end))

    def batch(
        self,
        queued: Sequence[Queued],
        taken_at: float,
        start: float,
        end: float,
        attributes: dict[str, Any],
        error: BaseException | None = None,
    ) -> None:
        """For each traced request of a batch: its queue wait (submit to ``taken_at``) and
        the model run (``start`` to ``end``), as children of its request span."""
        for item in queued:
            if item.trace is None:
                continue
            wait = self.tracer.start_span(
                "queue wait", context=item.trace, start_time=self.ns(item.queued_at)
            )
            wait.end(end_time=self.ns(taken_at))
            run = self.tracer.start_span(
                "model run", context=item.trace, start_time=self.ns(start), attributes=attributes
            )
            _fail(run, error)
            run.end(end_time=self.ns(end))


class TraceRequests:
    """Pure ASGI middleware: a SERVER span per request, the caller's trace as its parent,
    current while the request runs so that the store's and batcher's spans nest under it."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        tracing = self.tracing
        start = time.perf_counter()
        parent = tracing.extract(scope["headers"])
        method, path = scope["method"], scope["path"]
        route = path if path in NAMED_ROUTES else None
        # The access log's id (app/api.py's RequestContext sets it outside), to find its line.
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": path,
            "rerank.request_id": REQUEST_ID.get(),
        }
        if route is not None:
            attributes["http.route"] = route
        span = tracing.tracer.start_span(
            f"{method} {route}" if route else method,
            context=parent,
            kind=SpanKind.SERVER,
            start_time=tracing.ns(start),
            attributes=attributes,
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status: int | None = None
        hung_up = False

        async def receive_traced() -> Message:
            nonlocal hung_up
            message = await receive()
            hung_up = hung_up or message["type"] == "http.disconnect"
            return message

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive_traced, send_traced)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error is not None:
                _fail(span, error)
            elif status is None and hung_up:  # the caller's doing, not a fault here
                span.set_attribute("rerank.client_hung_up", True)
            elif status is None or status >= 500:
                span.set_attribute("error.type", str(status or "incomplete_response"))
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=tracing.ns(time.perf_counter()))
            otel_context.detach(token)


def _fail(span: Any, error: BaseException | None) -> None:
    # The type only: messages may carry key names or a caller's input.
    if error is not None:
        name = type(error).__name__
        span.set_attribute("error.type", name)
        span.set_status(Status(StatusCode.ERROR, name))
