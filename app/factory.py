"""``create_app(settings)``: the one place where the service's parts are wired together."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.types import ASGIApp

from app.admission import Admission
from app.api import RequestContext, build_router
from app.batcher import Batcher
from app.config import Settings, cluster_url
from app.demo import install_demo
from app.docs import install_docs
from app.drain import Drain
from app.embedded import EmbeddedRedis
from app.errors import RerankError, StoreUnavailable, install_handlers
from app.feedback import Feedback
from app.guard import OPS_ROUTES, WORK_ROUTES, AdmissionGate, ApiKeyCheck
from app.items import EncoderQueue, ItemEncoder, ItemsService
from app.loader import load_into_redis
from app.metrics import Metrics
from app.model import choose_providers
from app.service import RerankService
from app.store import ClusterStore, Store, VectorCache
from app.swap import ModelHolder, ModelSpec, VersionWatcher
from app.tracing import TraceRequests, Tracing
from app.tracing import from_settings as tracing_from_settings
from contract import ManifestError, default_version

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0


def start_embedded(settings: Settings) -> EmbeddedRedis:
    """A private Redis holding the default model of ``settings.model_dir``, active."""
    server = EmbeddedRedis(
        port=settings.embedded_redis_port or None,
        maxmemory_mb=settings.embedded_redis_maxmemory_mb,
    ).start()
    version = default_version(settings.model_dir)
    if version is None:
        log.warning("no model in %s: answers stay degraded until one is loaded", settings.model_dir)
    else:
        load_into_redis(server.url, settings.model_dir / version, settings.key_prefix)
    return server


def redis_client(url: str, settings: Settings) -> Redis | RedisCluster:
    """A plain client, or a cluster client for ``redis+cluster://`` or ``redis_cluster``."""
    plain, is_cluster = cluster_url(url)
    # The per-request deadline (asyncio.timeout) bounds every call; socket timeouts are
    # a backstop only. Retrying inside a 50 ms deadline would only add load to a sick
    # Redis, so the client does not retry: the next request is the retry.
    options: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
        "retry": Retry(NoBackoff(), 0),
    }
    if is_cluster or settings.redis_cluster:
        # max_connections is per node here; a failed call makes the client re-read the
        # slot map before the next one, which is how it follows a node that came back.
        return RedisCluster.from_url(plain, **options)
    return Redis.from_url(url, **options)


def make_store(
    client: Redis | RedisCluster,
    settings: Settings,
    metrics: Metrics,
    tracing: Tracing | None = None,
) -> Store:
    cache = VectorCache(settings.cache_size)
    kind = ClusterStore if isinstance(client, RedisCluster) else Store
    return kind(
        client,
        settings.key_prefix,
        settings.redis_timeout_s,
        cache,
        metrics,
        settings.history_ttl_s,
        tracing,
        settings.redis_retry_s,
    )


async def bounded(name: str, close: Callable[[], Awaitable[object]]) -> None:
    """Close one part, but never let it hold up the shutdown of the others."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await close()
    except TimeoutError:
        log.warning("closing the %s took over %g s; shut down without it", name, CLOSE_TIMEOUT_S)


async def start_items(
    settings: Settings,
    store: Store,
    holder: ModelHolder,
    metrics: Metrics,
    spec: ModelSpec,
    stack: AsyncExitStack,
) -> ItemsService:
    """POST /items: its encoder worker, and the item encoder loaded now only when the active
    model has an item tower (a model without one loads nothing: no memory for it)."""
    queue = EncoderQueue(settings.items_queue)
    stack.callback(queue.close)
    encoder = ItemEncoder(settings.model_dir, spec.providers)
    model = holder.model
    if model is not None and model.manifest.item_tower is not None:
        try:
            await asyncio.to_thread(encoder.preload, model.manifest)
        except (RerankError, ManifestError, OSError) as exc:  # /items says so; /rerank serves
            log.error("the item encoder of %s did not load: %s", model.version, exc)
    return ItemsService(store, encoder, queue, metrics, holder)


class RerankApp(FastAPI):
    """FastAPI with the service's front outside all of its middleware (its own included): a
    request the front answers (401, 408, 413, the overload 503) costs a few calls, not a pass
    through every layer (app/guard.py)."""

    def __init__(self, front: Callable[[ASGIApp], ASGIApp], **kwargs: Any) -> None:
        self.front = front
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return self.front(super().build_middleware_stack())


def front(
    app: ASGIApp,
    settings: Settings,
    admission: Admission,
    metrics: Metrics,
    tracing: Tracing | None,
) -> ASGIApp:
    """Outermost first: the request context (id, log, latency), the request's span when
    tracing is on, the API key, the body and admission; then FastAPI's own stack."""
    app = AdmissionGate(
        app,
        admission,
        settings.max_body_bytes,
        settings.body_timeout_s,
        settings.retry_after_s,
        metrics,
    )
    keys = [k.get_secret_value().encode() for k in settings.api_keys]
    if keys:
        guarded = WORK_ROUTES | OPS_ROUTES if settings.protect_ops else WORK_ROUTES
        app = ApiKeyCheck(app, keys, guarded)
    if tracing is not None:  # the request span covers the body read and the wait for a slot
        app = TraceRequests(app, tracing)
    return RequestContext(app, metrics)


def create_app(settings: Settings, tracing: Tracing | None = None) -> FastAPI:
    """The service; its lifespan opens Redis, the model and the batcher, closes in reverse.

    ``tracing``: where spans go; by default from the settings (app/tracing.py), None when
    no OTLP endpoint is configured.
    """
    metrics = Metrics()
    if tracing is None:
        tracing = tracing_from_settings(settings)
    drain = Drain(settings.shutdown_delay_s)
    admission = Admission(
        settings.max_inflight,
        settings.max_waiting,
        settings.latency_target_ms / 1000,
        settings.queue_timeout_ms / 1000,
        metrics,
        interval_s=settings.queue_interval_ms / 1000,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            drain.install()  # first: a SIGTERM during start-up drains as well
            stack.callback(drain.uninstall)
            stack.callback(metrics.close)  # last: the worker's live gauges leave the scrape
            if tracing is not None:  # after the batcher: its last spans are exported
                stack.push_async_callback(
                    bounded, "trace exporter", partial(asyncio.to_thread, tracing.shutdown)
                )
            url = settings.redis_url
            if url is None:  # `uvicorn app.main:app` without Redis: a private one
                server = await asyncio.to_thread(start_embedded, settings)
                stack.callback(server.close)
                url = server.url
            client = redis_client(url, settings)
            stack.push_async_callback(bounded, "redis client", client.aclose)
            store = make_store(client, settings, metrics, tracing)
            holder = ModelHolder()
            batcher = Batcher(
                settings.max_batch,
                metrics,
                tracing,
                alone=admission.alone,
                inline_max_s=settings.model_inline_ms / 1000,
            )
            batcher.start()
            stack.push_async_callback(bounded, "batcher", batcher.close)
            spec = ModelSpec(
                settings.model_dir,
                choose_providers(settings.onnx_providers),
                settings.onnx_threads,
                settings.max_candidates,
                settings.max_batch,
            )
            watcher = VersionWatcher(store, holder, spec, settings.version_poll_s, metrics)
            try:
                await store.prepare()
                # A manifest or model that does not match refuses the start (raises here);
                # a Redis that does not answer yet only delays the model: the watcher retries.
                await watcher.poll_once(strict=True)
            except StoreUnavailable as exc:
                log.warning("starting without a model, Redis unavailable: %s", exc)
            watcher.start()
            stack.push_async_callback(bounded, "version watcher", watcher.close)
            feedback = None
            if settings.feedback_top_k:
                feedback = Feedback(
                    store, metrics, settings.feedback_top_k, settings.feedback_ttl_s
                )
                feedback.start()  # closed before Redis: what is queued still goes out
                stack.push_async_callback(bounded, "feedback writer", feedback.close)
            app.state.service = RerankService(
                store,
                holder,
                batcher,
                metrics,
                settings.explain_top,
                settings.max_history,
                feedback,
            )
            app.state.holder = holder
            app.state.batcher = batcher
            app.state.items = await start_items(settings, store, holder, metrics, spec, stack)
            # What start-up built lives as long as the process: moved out of the
            # collector's reach (after a last collection of start-up's garbage), it is not
            # scanned again by every full collection, a pause that would land on a request.
            gc.collect()
            gc.freeze()
            yield

    app = RerankApp(
        partial(front, settings=settings, admission=admission, metrics=metrics, tracing=tracing),
        title="rerank",
        summary="Reranks a recall list with a deep model over Redis-cached item vectors.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # app/docs.py serves /docs and /redoc with their own assets
        redoc_url=None,
        # FastAPI's own OpenTelemetry hooks stay off: app/tracing.py traces the requests
        # (inside the door), and the hooks' check of the global providers costs every
        # request some microseconds even with nothing configured.
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    install_docs(app)
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.drain = drain
    install_handlers(app, settings.retry_after_s)
    app.include_router(build_router(settings))
    install_demo(app, settings)  # after the API: its routes are matched first
    return app
