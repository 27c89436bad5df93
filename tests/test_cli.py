"""The rerank command: load, serve with an embedded Redis, offline verbs, no torch import."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import redis

from app import cli
from app.embedded import EmbeddedRedis
from tests.conftest import VERSION_A, VERSION_B


def test_load(
    monkeypatch: pytest.MonkeyPatch, redis_server: EmbeddedRedis, prefix: str, model_dir: Path
) -> None:
    monkeypatch.setenv("RERANK_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RERANK_KEY_PREFIX", prefix)
    assert cli.main(["load", str(model_dir / VERSION_A)]) == 0
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get(f"{prefix}:active") == VERSION_A.encode()
    finally:
        client.close()


def test_load_needs_a_redis_url(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setenv("RERANK_REDIS_URL", "")
    assert cli.main(["load", str(model_dir / VERSION_A)]) == 2


def test_serve_without_redis_starts_one_with_the_default_model(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    monkeypatch.setenv("RERANK_REDIS_URL", "")  # restored afterwards, serve sets it
    monkeypatch.setenv("RERANK_MODEL_DIR", str(model_dir))
    seen: dict[str, Any] = {}

    def fake_run(target: str, **kwargs: Any) -> None:
        seen.update(kwargs, target=target)
        client = redis.Redis.from_url(os.environ["RERANK_REDIS_URL"])
        try:
            seen["active"] = client.get("rr:active")
        finally:
            client.close()

    monkeypatch.setattr("uvicorn.run", fake_run)
    assert cli.main(["serve", "--port", "8123", "--workers", "2"]) == 0
    assert seen["target"] == "app.main:app"
    assert (seen["port"], seen["workers"], seen["loop"], seen["http"]) == (
        8123,
        2,
        "uvloop",
        "httptools",
    )
    assert seen["active"] == VERSION_B.encode()  # the newest folder: no models/DEFAULT here


def test_sigterm_stops_the_embedded_redis_too(model_dir: Path) -> None:
    """uvicorn re-raises SIGTERM after its shutdown; the embedded Redis must not outlive it."""
    import re
    import signal
    import time

    from app.embedded import free_port

    env = {k: v for k, v in os.environ.items() if k != "RERANK_REDIS_URL"}
    env.update(RERANK_MODEL_DIR=str(model_dir), RERANK_SHUTDOWN_DELAY_S="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"embedded Redis at (redis://\S+)", line)
        url = found.group(1) if found else None
    assert url, "rerank serve did not report its embedded Redis"
    time.sleep(1.0)  # let uvicorn install its own signal handlers
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()


def test_offline_verbs_go_to_training_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    fake = types.ModuleType("training.cli")
    fake.main = lambda argv: calls.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.cli", fake)
    assert cli.main(["train", "--epochs", "1"]) == 0
    assert calls == [["train", "--epochs", "1"]]


def test_the_service_never_imports_torch_or_training() -> None:
    code = (
        "import sys, app.main, app.cli\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('training')]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "RERANK_REDIS_URL": "redis://127.0.0.1:1/0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
