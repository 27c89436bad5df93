"""A raw ASGI request for tests that drive the app below the HTTP client: a body that never
comes, a caller that hangs up mid-body."""

from __future__ import annotations

from typing import Any


def rerank_scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """The ASGI scope of ``POST /rerank`` with these headers."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/rerank",
        "raw_path": b"/rerank",
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
