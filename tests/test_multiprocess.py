"""Metrics under `rerank serve --workers N`: every scrape reads every worker's share.

prometheus-client picks its multiprocess mode once, at import, from the environment, so the
test process itself stays in single-process mode: the real workers run as `rerank serve`,
and the multiprocess behaviour of one process runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import cli
from app.embedded import free_port
from app.metrics import MULTIPROC_ENV

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 40
SCRAPES = 6


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def rerank_count(text: str) -> float:
    return sum(
        value
        for labels, value in samples(text, "rerank_request_seconds_count")
        if labels.get("route") == "/rerank" and labels.get("status") == "200"
    )


def both_workers_serve(text: str) -> bool:
    """Two workers' admission gauges (label pid), and a model loaded in every live one."""
    pids = {labels.get("pid") for labels, _ in samples(text, "rerank_admission_limit")}
    loaded = samples(text, "rerank_model_loaded")
    return len(pids - {None}) == 2 and loaded == [({}, 1.0)]


def test_every_scrape_of_two_workers_counts_every_request(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RERANK_", "PROMETHEUS_"))}
    env.update(RERANK_MODEL_DIR=str(model_dir), RERANK_SHUTDOWN_DELAY_S="0")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        # Each worker logs this once its lifespan (Redis, model) is through.
        deadline = time.monotonic() + 120
        while log.read_text().count("Application startup complete") < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"two workers never started:\n{log.read_text()}"
            time.sleep(0.2)

        ids = (model_dir / "test-a" / "item_ids.txt").read_text().split()[:20]
        body = json.dumps({"user_id": "7", "candidates": ids, "k": 5}).encode()
        for _ in range(REQUESTS):
            # A new connection each time: the kernel hands connections to either worker.
            request = urllib.request.Request(
                base + "/rerank", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200

        counts, texts = [], []
        for _ in range(SCRAPES):
            status, text = _get(base + "/metrics")
            assert status == 200
            texts.append(text.decode())
            counts.append(rerank_count(texts[-1]))
        assert counts == [REQUESTS] * SCRAPES
        assert all(both_workers_serve(text) for text in texts)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    found = re.search(r"metrics of 2 workers shared through (\S+)", log.read_text())
    assert found, log.read_text()
    assert not Path(found.group(1)).exists(), "the private metrics folder outlived the server"


def test_serve_shares_a_folder_only_between_workers(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.setenv("RERANK_REDIS_URL", "redis://127.0.0.1:1/0")  # no embedded Redis
    monkeypatch.setenv("RERANK_MODEL_DIR", str(model_dir))
    seen: list[str | None] = []

    def fake_run(target: str, **kwargs: Any) -> None:
        folder = os.environ.get(MULTIPROC_ENV)
        assert folder is None or Path(folder).is_dir()
        seen.append(folder)

    monkeypatch.setattr("uvicorn.run", fake_run)
    assert cli.main(["serve", "--workers", "1"]) == 0
    assert cli.main(["serve", "--workers", "3"]) == 0
    one, three = seen
    assert one is None  # one process: its own registry
    assert three is not None and not Path(three).exists()  # private, removed afterwards
    assert MULTIPROC_ENV not in os.environ

    # The operator's folder: kept, but emptied of a previous run's metric files.
    configured = tmp_path / "prom"
    configured.mkdir()
    (configured / "counter_12345.db").write_bytes(b"from a previous run")
    (configured / "notes.txt").write_text("not ours")
    monkeypatch.setenv(MULTIPROC_ENV, str(configured))
    assert cli.main(["serve", "--workers", "2"]) == 0
    assert seen[-1] == str(configured)
    assert sorted(p.name for p in configured.iterdir()) == ["notes.txt"]


MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from prometheus_client.parser import text_string_to_metric_families
    from app.metrics import Metrics, multiprocess

    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    dead = int(sys.argv[1])
    (folder / f"gauge_liveall_{dead}.db").write_bytes(b"")  # a worker killed earlier
    assert multiprocess()
    m = Metrics()  # sweeps the dead worker's live gauges
    assert not (folder / f"gauge_liveall_{dead}.db").exists()
    m.admission_limit.set(7)
    m.model_loaded.set(1)
    m.active_version.info({"version": "a"})
    m.active_version.info({"version": "b"})
    m.latency.labels("/rerank", "200").observe(0.001)

    def read():
        out = {}
        for family in text_string_to_metric_families(m.render().decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    got = read()
    pid = str(os.getpid())
    assert got[("rerank_admission_limit", (("pid", pid),))] == 7
    assert got[("rerank_model_loaded", ())] == 1
    assert got[("rerank_model_info", (("version", "a"),))] == 0
    assert got[("rerank_model_info", (("version", "b"),))] == 1
    assert got[("rerank_request_seconds_count", (("route", "/rerank"), ("status", "200")))] == 1
    m.close()  # the worker exits: its gauges leave, its counts stay
    assert not list(folder.glob(f"gauge_live*_{pid}.db"))
    got = read()
    assert not any(name == "rerank_admission_limit" for name, _ in got)
    assert got[("rerank_request_seconds_count", (("route", "/rerank"), ("status", "200")))] == 1
    """
)


def test_one_process_in_multiprocess_mode(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, str(gone.pid)],
        check=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
