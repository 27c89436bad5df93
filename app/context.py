"""The record of the HTTP request being served, shared by the layers that serve it.

``RequestContext`` (app/api.py) opens one ``Call`` per request and makes it current for the
request's task; a layer below writes what it learns on it without knowing who reads it (the
admission gate, that it refused the request for overload). Outside a request (start-up, the
version watcher) there is no current call.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Call:
    """One request's notes, filled in by the layers that serve it."""

    refused: bool = False  # refused for overload (app/guard.py): logged in sum, not per line
    model_version: str | None = None  # the version that scored the answer (app/service.py)


CURRENT: ContextVar[Call | None] = ContextVar("rerank_call", default=None)
