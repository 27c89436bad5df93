"""Locust scenario: the benchmark's traffic, for operators who drive load with Locust.

Each simulated user replays the traffic file (Zipf-like users, recall candidates, k=10, a
small share of /events writes) from its own offset. Headless, against a running service::

    RERANK_TRAFFIC=loadtest/traffic/ml100k-knn-1000-20000-s0.json \\
    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 1m --host http://127.0.0.1:8000

Environment: RERANK_TRAFFIC (a traffic file; ``python loadtest/bench.py`` writes one),
RERANK_CANDIDATES (default 100), RERANK_K (10), RERANK_USER_RPS (requests per second per
simulated user, default 1: Locust's users are a closed loop; use loadtest/gen.py or bench.py
for open-loop latency), RERANK_API_KEY (sent as X-API-Key when set).

Locust's users wait for each answer before the next request, so under overload they slow
down with the service and hide queueing; its percentiles are for operations, the benchmark's
are the ones to quote.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from locust import constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest import traffic as tf  # noqa: E402


def _traffic_file() -> Path:
    named = os.environ.get("RERANK_TRAFFIC")
    if named:
        return Path(named)
    found = sorted((ROOT / "loadtest" / "traffic").glob("*.json"))
    if not found:
        raise SystemExit("no traffic file: set RERANK_TRAFFIC or run loadtest/bench.py once")
    return found[0]


BODIES = tf.bodies(
    tf.read(_traffic_file()),
    int(os.environ.get("RERANK_CANDIDATES", "100")),
    int(os.environ.get("RERANK_K", "10")),
)
HEADERS = {"Content-Type": "application/json"}
if os.environ.get("RERANK_API_KEY"):
    HEADERS["X-API-Key"] = os.environ["RERANK_API_KEY"]
_offsets = itertools.count(0, 997)  # users start at different places in the file


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
