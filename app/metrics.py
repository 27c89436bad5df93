"""Prometheus metrics of one service instance.

Each app gets its own ``CollectorRegistry`` so that several apps (tests, workers) never clash
on the process-wide default registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import Info as InfoMetric

# Latency buckets in seconds: the service answers in milliseconds, so resolve 0.5 ms .. 1 s.
FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "rerank_request_seconds",
            "HTTP request latency by route and status",
            ["route", "status"],
            buckets=FAST,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rerank_queue_wait_seconds",
            "Time a request waits in the batch queue before its batch runs",
            buckets=FAST,
            registry=r,
        )
        self.batch_size = Histogram(
            "rerank_batch_size", "Requests per model run", buckets=BATCH_SIZES, registry=r
        )
        self.model_seconds = Histogram(
            "rerank_model_seconds", "Time of one batched model run", buckets=FAST, registry=r
        )
        self.redis_seconds = Histogram(
            "rerank_redis_seconds",
            "Time of one Redis round trip",
            ["op"],
            buckets=FAST,
            registry=r,
        )
        self.cache_hits = Counter(
            "rerank_cache_hits", "Candidate vectors found in the process cache", registry=r
        )
        self.cache_misses = Counter(
            "rerank_cache_misses", "Candidate vectors read from Redis", registry=r
        )
        self.missing_vectors = Counter(
            "rerank_missing_vectors", "Candidates without a vector (ranked last)", registry=r
        )
        self.degraded = Counter(
            "rerank_degraded", "Answers in the caller's order, by reason", ["reason"], registry=r
        )
        self.shed = Counter(
            "rerank_shed", "Requests refused for overload (503 with Retry-After)", registry=r
        )
        self.admission_limit = Gauge(
            "rerank_admission_limit",
            "Work requests one process takes on at once (max_inflight, app/admission.py)",
            registry=r,
        )
        self.swap_failures = Counter(
            "rerank_model_swap_failures", "New model versions that failed to load", registry=r
        )
        self.swaps = Counter(
            "rerank_model_swaps", "Model versions loaded and swapped in", registry=r
        )
        self.active_version = InfoMetric(
            "rerank_model", "The model version serving requests", registry=r
        )
        self.model_loaded = Gauge(
            "rerank_model_loaded", "1 when a model is loaded and serving", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
