"""Locust scenario: the benchmark's traffic, for operators who drive load with Locust.

Each simulated user replays the traffic (Zipf-like users, recall candidates, k=10, a small
share of /events writes) from its own offset. Headless, against a running service, from the
repository's root (``python -m`` puts it on the import path)::

    python -m locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 1m \\
        --host http://127.0.0.1:8000

Environment: RERANK_TRAFFIC (a traffic file; else the first in loadtest/traffic/, which
``python -m loadtest.bench`` fills, else traffic drawn over the default model's item ids),
RERANK_CANDIDATES (default 100), RERANK_K (10), RERANK_USER_RPS (requests per second per
simulated user, default 1), RERANK_API_KEY (sent as X-API-Key when set).

Locust's users wait for each answer before the next request, so under overload they slow
down with the service and hide queueing; its percentiles are for operations, the
benchmark's open-loop ones are the ones to quote.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser

from loadtest import traffic as tf

CANDIDATES = int(os.environ.get("RERANK_CANDIDATES", "100"))
NAMED = os.environ.get("RERANK_TRAFFIC")
BODIES = tf.bodies(
    tf.for_replay(Path(NAMED) if NAMED else None, max(CANDIDATES, 100)),
    CANDIDATES,
    int(os.environ.get("RERANK_K", "10")),
)
HEADERS = {"Content-Type": "application/json"}
if os.environ.get("RERANK_API_KEY"):
    HEADERS["X-API-Key"] = os.environ["RERANK_API_KEY"]
_offsets = itertools.count(0, 997)  # users start at different places in the traffic


class RerankUser(FastHttpUser):
    wait_time = constant_throughput(float(os.environ.get("RERANK_USER_RPS", "1")))

    def on_start(self) -> None:
        self.requests = itertools.islice(
            itertools.cycle(BODIES), next(_offsets) % len(BODIES), None
        )

    @task
    def replay(self) -> None:
        path, body = next(self.requests)
        # geventhttpclient sends bytes as they are; locust's annotation names only str and dict
        with self.client.post(
            path,
            data=body,  # type: ignore[arg-type]
            headers=HEADERS,
            catch_response=True,
        ) as resp:
            if resp.status_code == 200 and b'"degraded":true' in (resp.content or b""):
                resp.failure("degraded answer")
