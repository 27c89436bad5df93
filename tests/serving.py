"""The app as tests drive it below and behind the HTTP client: a raw ASGI request (a body
that never comes, a caller that hangs up mid-body) and a real uvicorn server in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from app.config import Settings
from app.embedded import free_port
from app.factory import create_app


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


@contextmanager
def running(settings: Settings, **options: Any) -> Iterator[str]:
    """The app under uvicorn in a thread (``options`` go to ``uvicorn.Config``); yields its
    base URL once it accepts requests."""
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(15)
