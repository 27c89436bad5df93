"""Settings: environment prefix, documented fields, impossible values refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.config import Settings, settings_table


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_defaults() -> None:
    s = settings()
    assert s.redis_url is None and s.key_prefix == "rr" and s.port == 8000
    assert s.redis_timeout_ms == 50 and s.cache_size == 100_000 and s.max_candidates == 1000
    assert s.onnx_providers == []


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_read_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_MAX_BATCH", "4")
    monkeypatch.setenv("RERANK_REDIS_URL", "redis://example:6380/1")
    monkeypatch.setenv("RERANK_ONNX_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("RERANK_LOG_LEVEL", "debug")
    s = settings()
    assert s.max_batch == 4 and s.redis_url == "redis://example:6380/1"
    assert s.onnx_providers == ["CPUExecutionProvider"] and s.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_batch", 0),
        ("max_waiting", -1),
        ("latency_target_ms", 0),
        ("queue_timeout_ms", 0),
        ("queue_interval_ms", 0),
        ("body_timeout_s", 0),
        ("max_candidates", 0),
        ("max_k", -1),
        ("max_history", 0),
        ("redis_timeout_ms", 0),
        ("version_poll_s", 0),
        ("cache_size", -5),
        ("onnx_threads", -1),
        ("port", 70000),
        ("key_prefix", ""),
        ("key_prefix", "a b"),
        ("redis_url", "localhost:6379"),
        ("log_level", "LOUD"),
        ("log_format", "xml"),
        ("history_ttl_days", -1),
        ("embedded_redis_port", -1),
        ("embedded_redis_port", 70000),
        ("embedded_redis_maxmemory_mb", -1),
        ("onnx_providers", "NoSuchExecutionProvider"),
    ],
)
def test_impossible_values_are_refused_by_name(key: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=key):
        settings(**{key: value})


def test_settings_table_lists_every_setting() -> None:
    table = settings_table()
    for name in Settings.model_fields:
        assert f"`RERANK_{name.upper()}`" in table
    assert "| `RERANK_REDIS_TIMEOUT_MS` | `50.0` |" in table


def test_history_ttl_in_seconds() -> None:
    assert settings().history_ttl_s == 30 * 86400
    assert settings(history_ttl_days=0.5).history_ttl_s == 43200
    assert settings(history_ttl_days=1e-9).history_ttl_s == 1  # never rounded down to "never"
    assert settings(history_ttl_days=0).history_ttl_s == 0


def test_log_format_is_case_blind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_LOG_FORMAT", "JSON")
    assert settings().log_format == "json"
