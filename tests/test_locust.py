"""Locust works from a fresh clone: traffic without a traffic file, and a headless run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app.embedded import free_port
from loadtest import traffic as tf
from loadtest.harness import ROOT, Server, uvicorn_cmd


def test_replay_traffic_comes_from_the_default_model_without_a_traffic_file(
    tmp_path: Path,
) -> None:
    traffic = tf.for_replay(traffic_dir=tmp_path / "empty")
    path, body = next(b for b in tf.bodies(traffic, 100, 10) if b[0] == "/rerank")
    request = json.loads(body)
    models = ROOT / "models"
    folder = models / (models / "DEFAULT").read_text().strip()
    known = set((folder / "item_ids.txt").read_text().splitlines())
    assert len(request["candidates"]) == 100
    assert set(request["candidates"]) <= known
    assert request["k"] == 10


def test_locust_runs_headless_against_a_server(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RERANK_TRAFFIC"}
    server = Server("http-floor", uvicorn_cmd("loadtest.peers.nothing:app", port), env, port,
                    tmp_path)  # fmt: skip
    try:
        server.wait_ready(60)
        done = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
             "-u", "2", "-r", "2", "-t", "2s", "--host", f"http://127.0.0.1:{port}",
             "--only-summary", "--json"],
            cwd=ROOT, env={**env, "RERANK_USER_RPS": "20"}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout)
    assert sum(s["num_requests"] for s in stats) > 0
    assert sum(s["num_failures"] for s in stats) == 0
