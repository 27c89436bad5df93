"""Log lines: one record a line whatever a caller sends, in text or JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.logs import escape, make_handler

FORGED = "2026-11-30 00:00:00,000 INFO app.access [forged] GET /admin 200 0.1ms"


@pytest.fixture(params=["text", "json"])
def logged(request: pytest.FixtureRequest) -> Iterator[tuple[str, io.StringIO]]:
    """The root logger writing to a buffer in the service's own format, INFO and up."""
    stream = io.StringIO()
    handler = make_handler(request.param, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield request.param, stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def records(log_format: str, stream: io.StringIO, logger: str | None = None) -> list[Any]:
    """The records written, as dicts (json) or lines (text); those of ``logger`` if given."""
    lines = stream.getvalue().splitlines()
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        return [e for e in entries if logger in (None, e["logger"])]
    return [line for line in lines if logger in (None, line.split(" ", 4)[3])]


def test_escape() -> None:
    assert escape("plain text, ünïcode") == "plain text, ünïcode"
    assert escape("a\nb\rc\td\x1b[31me\x00f\x7fg\x85h\u2028i\ud800") == (
        "a\\nb\\rc\\td\\x1b[31me\\x00f\\x7fg\\x85h\\u2028i\\ud800"
    )


def test_a_forged_line_stays_inside_its_record(logged: tuple[str, io.StringIO]) -> None:
    log_format, stream = logged
    log = logging.getLogger("app.service")
    log.warning("degraded answer for user %s: %s", f"evil\n{FORGED}", "redis down\r\x1b[2K")
    found = records(log_format, stream)
    assert len(found) == 1
    if log_format == "json":
        assert (
            found[0]["message"] == f"degraded answer for user evil\n{FORGED}: redis down\r\x1b[2K"
        )
        assert {"time", "level", "logger", "request_id", "message"} <= set(found[0])
        assert (found[0]["level"], found[0]["logger"]) == ("WARNING", "app.service")
    else:
        assert found[0].endswith(f"user evil\\n{FORGED}: redis down\\r\\x1b[2K")


def test_the_access_log_escapes_the_path(
    client: TestClient, logged: tuple[str, io.StringIO]
) -> None:
    log_format, stream = logged
    response = client.get(
        "/x%0a2026-11-30%2000:00:00,000%20INFO%20app.access%20[forged]%20x%0d%1b",
        headers={"X-Request-ID": "probe-1"},
    )
    assert response.status_code == 404
    access = records(log_format, stream, "app.access")
    assert len(access) == 1, stream.getvalue()
    if log_format == "json":
        assert access[0]["request_id"] == "probe-1" and access[0]["logger"] == "app.access"
        assert access[0]["message"].startswith("GET /x\n2026-11-30")
    else:
        assert (
            "[probe-1] GET /x\\n2026-11-30 00:00:00,000 INFO app.access [forged] x\\r\\x1b"
            in (access[0])
        )
    for line in stream.getvalue().splitlines():
        assert not line.startswith("2026-11-30 00:00:00")


def test_a_traceback_keeps_its_lines_indented(logged: tuple[str, io.StringIO]) -> None:
    log_format, stream = logged
    try:
        raise ValueError(f"bad id\n{FORGED}")
    except ValueError:
        logging.getLogger("app").exception("failed for %s", "u1")
    if log_format == "json":
        (entry,) = records(log_format, stream)
        assert entry["message"] == "failed for u1" and "ValueError: bad id" in entry["exc_info"]
        return
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("failed for u1") and rest
    assert all(line.startswith("    ") for line in rest)
    assert any(line.strip() == "ValueError: bad id" for line in rest)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log_format"):
        make_handler("xml")
