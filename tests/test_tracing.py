"""OpenTelemetry tracing (app/tracing.py): the spans of a request, the caller's trace
context, and nothing at all when no endpoint is configured."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.config import Settings
from app.factory import create_app
from app.tracing import TraceRequests, Tracing, endpoint, from_settings
from tests.conftest import serve
from tests.serving import rerank_scope

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def traceparent(sampled: bool = True) -> str:
    return f"00-{TRACE_ID}-{PARENT_ID}-{'01' if sampled else '00'}"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(
    loaded: str, settings_factory: Callable[..., Settings], exporter: InMemorySpanExporter
) -> Iterator[TestClient]:
    # Simple processor: each span is exported as it ends, so the test reads them at once.
    app = create_app(settings_factory(), tracing=Tracing(exporter, batch=False))
    with TestClient(app) as client:
        exporter.clear()  # start-up's Redis calls are outside any request: none expected
        yield client


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    named = {s.name: s for s in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


def test_one_rerank_gives_four_spans_in_the_callers_trace(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    candidates = [str(i) for i in range(1, 11)]
    response = traced.post(
        "/rerank",
        json={"user_id": "u1", "candidates": candidates, "k": 5},
        headers={"traceparent": traceparent()},
    )
    assert response.status_code == 200 and response.json()["degraded"] is False
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST /rerank", "redis fetch", "queue wait", "model run"}

    request = spans["POST /rerank"]
    assert request.kind is SpanKind.SERVER
    assert request.parent is not None and request.parent.is_remote
    assert format(request.parent.span_id, "016x") == PARENT_ID  # the caller's span
    assert request.attributes is not None
    assert request.attributes["http.route"] == "/rerank"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["rerank.request_id"] == response.headers["x-request-id"]
    assert request.status.status_code is StatusCode.UNSET
    assert request.start_time is not None and request.end_time is not None

    for span in spans.values():
        assert format(span.context.trace_id, "032x") == TRACE_ID
    for name in ("redis fetch", "queue wait", "model run"):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == request.context.span_id
        assert child.start_time is not None and child.end_time is not None
        # Recorded from the batch's and the store's stamps: inside the request's span.
        assert request.start_time <= child.start_time <= child.end_time <= request.end_time
    assert spans["redis fetch"].kind is SpanKind.CLIENT
    wait, run = spans["queue wait"], spans["model run"]
    assert wait.end_time is not None and run.start_time is not None
    assert wait.end_time <= run.start_time
    assert run.attributes is not None and run.attributes["rerank.batch_size"] == 1
    assert run.attributes["rerank.model_version"] == response.json()["model_version"]


def test_without_a_traceparent_the_request_starts_a_trace(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    assert traced.post("/events", json={"user_id": "u2", "item_ids": ["i1"]}).status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST /events", "redis events"}
    assert spans["POST /events"].parent is None
    parent = spans["redis events"].parent
    assert parent is not None and parent.span_id == spans["POST /events"].context.span_id


def test_probes_and_unsampled_callers_record_nothing(
    traced: TestClient, exporter: InMemorySpanExporter
) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert traced.get(path).status_code == 200
    response = traced.post(
        "/rerank",
        json={"user_id": "u1", "candidates": ["1", "2"]},
        headers={"traceparent": traceparent(sampled=False)},
    )
    assert response.status_code == 200
    assert exporter.get_finished_spans() == ()


def degraded_rerank(client: TestClient, exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """The spans of one /rerank that the test has broken: its answer comes back degraded."""
    exporter.clear()
    answer = client.post("/rerank", json={"user_id": "u1", "candidates": ["1", "2"]})
    assert answer.status_code == 200 and answer.json()["degraded"] is True
    return by_name(exporter.get_finished_spans())


def test_a_failed_redis_call_marks_its_span(
    traced: TestClient, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(traced.app.state.service.store, "_fetch_script", broken)  # type: ignore[attr-defined]
    spans = degraded_rerank(traced, exporter)
    assert set(spans) == {"POST /rerank", "redis fetch"}
    failed = spans["redis fetch"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "StoreUnavailable"


def test_a_failed_batch_marks_its_model_run(
    traced: TestClient, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(jobs: Any) -> None:
        raise RuntimeError("onnx runtime fell over")

    monkeypatch.setattr(traced.app.state.holder.model, "run_batch", broken)  # type: ignore[attr-defined]
    spans = degraded_rerank(traced, exporter)
    assert set(spans) == {"POST /rerank", "redis fetch", "queue wait", "model run"}
    assert spans["model run"].status.status_code is StatusCode.ERROR
    assert spans["queue wait"].status.status_code is StatusCode.UNSET


def test_a_caller_that_hangs_up_is_not_an_error(
    loaded: str, settings_factory: Callable[..., Settings], exporter: InMemorySpanExporter
) -> None:
    app = create_app(settings_factory(), tracing=Tracing(exporter, batch=False))
    scope = rerank_scope((b"content-type", b"application/json"), (b"content-length", b"100"))
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}  # gone before the body came

    async def send(message: Any) -> None:
        sent.append(message)

    async def main() -> None:
        async with serve(app):
            exporter.clear()
            await app(scope, receive, send)

    asyncio.run(main())
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST /rerank"
    assert span.attributes is not None and span.attributes["rerank.client_hung_up"] is True
    assert span.status.status_code is StatusCode.UNSET


# --- on or off ----------------------------------------------------------------------------


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("rerank", "environ", "url"),
    [
        (None, {}, None),
        ("http://collector:4318", {}, "http://collector:4318/v1/traces"),
        ("http://collector:4318/", {}, "http://collector:4318/v1/traces"),
        ("https://c:4318/v1/traces", {}, "https://c:4318/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://o:4318"}, "http://o:4318/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://o:9/x"}, "http://o:9/x"),
        (
            "http://r:4318",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://o:4318"},
            "http://r:4318/v1/traces",
        ),
        ("http://r:4318", {"OTEL_SDK_DISABLED": "true"}, None),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://o:1", "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_endpoint(rerank: str | None, environ: dict[str, str], url: str | None) -> None:
    assert endpoint(settings(otlp_endpoint=rerank), environ) == url


def test_a_bad_endpoint_or_protocol_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint"):
        settings(otlp_endpoint="collector:4318")
    grpc = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        from_settings(settings(otlp_endpoint="http://collector:4318"), grpc)


def test_an_endpoint_turns_tracing_on(
    monkeypatch: pytest.MonkeyPatch, settings_factory: Callable[..., Settings]
) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    # The front (app/factory.py): the request context outermost, the request span inside it.
    off = create_app(settings_factory()).build_middleware_stack()
    assert not isinstance(getattr(off, "app", None), TraceRequests)
    on = create_app(settings_factory(otlp_endpoint="http://127.0.0.1:1")).build_middleware_stack()
    traced = getattr(on, "app", None)
    assert isinstance(traced, TraceRequests)
    traced.tracing.shutdown()  # nothing was exported: returns at once


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that keeps what it is sent."""

    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_spans_reach_the_configured_collector(
    loaded: str, settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    Collector.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        app = create_app(settings_factory(otlp_endpoint=url))
        with TestClient(app) as client:
            answer = client.post(
                "/rerank",
                json={"user_id": "u1", "candidates": ["1", "2"]},
                headers={"traceparent": traceparent()},
            )
            assert answer.status_code == 200
        # Leaving the lifespan flushes the exporter's queue.
    finally:
        server.shutdown()
        server.server_close()
    assert Collector.received, "nothing was exported"
    names = set()
    for path, content_type, body in Collector.received:
        assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            assert service["service.name"] == "rerank"
            for scope in resource.scope_spans:
                for span in scope.spans:
                    assert span.trace_id.hex() == TRACE_ID
                    names.add(span.name)
    assert names == {"POST /rerank", "redis fetch", "queue wait", "model run"}


def test_off_loads_neither_the_sdk_nor_the_exporter() -> None:
    code = (
        "import sys, app.main\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter'))]\n"
        "assert not loaded, loaded\n"
        "assert all(m.cls.__name__ != 'TraceRequests' for m in app.main.app.user_middleware)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RERANK_"))}
    env["RERANK_REDIS_URL"] = "redis://127.0.0.1:1/0"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
