"""Prometheus metrics of one service instance.

One process (tests, ``rerank serve`` with one worker): each app gets its own
``CollectorRegistry``, so that the many apps of a test run never clash on the process-wide
default registry.

Several worker processes behind one port (``rerank serve --workers N``): a scrape reaches
one worker at random, so each would answer with its own share. prometheus-client's
multiprocess mode is used instead: with ``PROMETHEUS_MULTIPROC_DIR`` set before it is
imported, every process writes its values to files in that folder, and ``render`` reads all
of them (``MultiProcessCollector``): counters and histograms are summed over the workers,
dead ones included, so they never go down; each gauge says how it combines (below). The
folder must be empty when the workers start: ``multiprocess_dir`` sees to that for
``rerank serve``. The model version is an ``Info`` in one process and a gauge here, since
``Info`` has no multiprocess form. How each metric combines: deploy/monitoring/METRICS.md.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client import Info as InfoMetric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets in seconds: the service answers in milliseconds, so resolve 0.5 ms .. 1 s.
FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess() -> bool:
    """Whether this process writes its values to ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus-client decides once, when it is first imported, from the environment; this
    asks it rather than the environment, which may have changed since.
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class ModelVersion:
    """``rerank_model_info{version}`` = 1: an ``Info`` in one process; in multiprocess mode
    a gauge per version, the previous one set to 0 on a swap, read as the highest value
    over the live workers (1 while any of them serves that version)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._info: InfoMetric | None = None
        self._gauge: Gauge | None = None
        self._current: str | None = None
        if multiprocess():
            self._gauge = Gauge(
                "rerank_model_info",
                "The model version serving requests",
                ["version"],
                registry=registry,
                multiprocess_mode="livemax",
            )
        else:
            self._info = InfoMetric(
                "rerank_model", "The model version serving requests", registry=registry
            )

    def info(self, labels: dict[str, str]) -> None:
        if self._info is not None:
            self._info.info(labels)
            return
        assert self._gauge is not None
        version = labels["version"]
        if self._current is not None and self._current != version:
            self._gauge.labels(self._current).set(0)
        self._gauge.labels(version).set(1)
        self._current = version


class Metrics:
    def __init__(self) -> None:
        if multiprocess():
            sweep_dead_processes()
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
        self.redis_skipped = Counter(
            "rerank_redis_skipped",
            "Redis calls not made: the calls before them got no answer (the breaker is open)",
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
        self.unknown_features = Counter(
            "rerank_unknown_features",
            "Candidate features the serving model does not declare (ignored)",
            registry=r,
        )
        self.degraded = Counter(
            "rerank_degraded", "Answers in the caller's order, by reason", ["reason"], registry=r
        )
        self.shed = Counter(
            "rerank_shed", "Requests refused for overload (503 with Retry-After)", registry=r
        )
        # Per process, so one series per live worker (label pid) in multiprocess mode.
        self.admission_limit = Gauge(
            "rerank_admission_limit",
            "Work requests one process takes on at once (max_inflight, app/admission.py)",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.swap_failures = Counter(
            "rerank_model_swap_failures", "New model versions that failed to load", registry=r
        )
        self.swaps = Counter(
            "rerank_model_swaps", "Model versions loaded and swapped in", registry=r
        )
        self.items_added = Counter(
            "rerank_items_added",
            "Items added after training (POST /items): a vector written under a live version",
            registry=r,
        )
        self.item_encoder_seconds = Histogram(
            "rerank_item_encoder_seconds",
            "Time of the item encoder (text encoder and item towers) for one /items call",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.item_attributes_ignored = Counter(
            "rerank_item_attributes_ignored",
            "Attribute names in /items calls that no live version reads (ignored)",
            registry=r,
        )
        self.active_version = ModelVersion(r)
        # Per version: every live version of a split has its own series.
        self.answers = Counter(
            "rerank_answers",
            "Answers scored by a model, by the version that scored them",
            ["version"],
            registry=r,
        )
        self.model_share = Gauge(
            "rerank_model_share",
            "Percent of users a live version answers (100: the active one, no split)",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.online_impressions = Counter(
            "rerank_online_impressions",
            "Answers remembered for online feedback, by the version that chose them",
            ["version"],
            registry=r,
        )
        self.online_hits = Counter(
            "rerank_online_hits",
            "Remembered answers an /events item was taken from, by version and the item's "
            "position (1, 2-3, 4-10, 11+)",
            ["version", "position"],
            registry=r,
        )
        self.online_write_failures = Counter(
            "rerank_online_write_failures",
            "Online feedback writes lost (Redis unavailable, or the queue full), by operation",
            ["op"],
            registry=r,
        )
        # Over the live workers, the lowest: 1 only when every worker serves a model.
        self.model_loaded = Gauge(
            "rerank_model_loaded",
            "1 when a model is loaded and serving",
            registry=r,
            multiprocess_mode="livemin",
        )

    def render(self) -> bytes:
        """The exposition: this app's registry, or every worker's files in multiprocess mode."""
        if not multiprocess():
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self) -> None:
        """The process is about to exit: its live gauges leave the multiprocess exposition."""
        if multiprocess():
            mark_process_dead(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the number
        return True
    return True


def sweep_dead_processes(path: str | None = None) -> None:
    """Drop the live gauges of processes that are gone without a ``close`` (killed workers,
    restarted by the server): their last values would otherwise stay in every scrape."""
    folder = path or os.environ.get(MULTIPROC_ENV) or os.environ["prometheus_multiproc_dir"]
    for name in glob.glob(os.path.join(folder, "gauge_live*_*.db")):
        pid = Path(name).stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), folder)


@contextlib.contextmanager
def multiprocess_dir(workers: int) -> Iterator[Path | None]:
    """The folder the workers of ``rerank serve`` share their metrics through.

    ``PROMETHEUS_MULTIPROC_DIR`` set: that folder, created if missing, its metric files of a
    previous run removed (prometheus-client requires an empty folder at start). Unset and
    more than one worker: a private temporary folder, set in the environment that the
    workers inherit and removed afterwards. Unset and one worker: none (one process, one
    registry).
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        folder = Path(configured)
        folder.mkdir(parents=True, exist_ok=True)
        stale = list(folder.glob("*.db"))
        for file in stale:
            file.unlink()
        log.info(
            "metrics shared through %s=%s (%d old files removed)",
            MULTIPROC_ENV,
            folder,
            len(stale),
        )
        yield folder
        return
    if workers <= 1:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="rerank-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)
    log.info("metrics of %d workers shared through %s", workers, folder)
    try:
        yield folder
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
