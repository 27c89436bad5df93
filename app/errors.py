"""The service's exceptions, and their one mapping to HTTP.

::

    RerankError                  base of everything the service raises on purpose
    ├── StoreUnavailable         Redis down, slow, or past the request deadline
    │                              /rerank: fail open (200, degraded); elsewhere 503
    ├── UnsupportedMediaType     a body that is not sent as application/json: 415
    ├── ModelError               ONNX Runtime failed to load or to run a model
    ├── ManifestMismatch         what Redis holds of a version does not match its manifest
    ├── LoadFailed               `rerank load` could not write or verify a version in Redis
    ├── VersionRefused           a version command's input is wrong (an unknown version, shares
                                   that do not sum to 100, a live version dropped): nothing
                                   was changed; `rerank` exits 2
    ├── NoItemTower              /items: no live version has an item tower: 409
    ├── ItemsBusy                /items: the item encoder's queue is full: the overload 503
    └── BadItems                 /items: an item the serving versions cannot read: 422

    contract.ManifestError       a model folder or manifest breaks the model contract
    └── ManifestMismatch         (both: one ``except ManifestError`` catches every mismatch)

Routes never catch broadly: the handlers below turn these into responses in one place.
Answers given before a request reaches the routes (401 without a valid API key, 408 and 413
for the body, 503 for overload) come from app/guard.py, rendered once at start-up.
FastAPI's ``RequestValidationError`` (a body or parameter the models refuse) is a 422 whose
errors are rendered by ``validation_errors``: whatever the caller sent renders, and what is
echoed of it is bounded.
A model folder is checked at start-up, at a swap and by `rerank load`, never in a route.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from contract import ManifestError

log = logging.getLogger(__name__)

# Bounds on what a 422 repeats of the caller's input: a 1 MB body is not sent back whole.
ECHO_CHARS = 200  # longest echo of one error's input (its JSON text), and of any string
MAX_ERRORS = 20  # errors listed in one 422, the first ones
_ITEMS = 20  # items of a list or dict looked at for an echo
_DEPTH = 4  # nesting looked into for an echo


class RerankError(Exception):
    """Base of the service's own errors."""


class StoreUnavailable(RerankError):
    """Redis did not answer in time or refused the connection.

    ``unreachable``: no answer came (a deadline, a refused or broken connection), as opposed
    to an answer that is an error (out of memory, a wrong type).
    """

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class UnsupportedMediaType(RerankError):
    """A request body sent without ``Content-Type: application/json``."""


class ModelError(RerankError):
    """ONNX Runtime could not load or run the model."""


class ManifestMismatch(RerankError, ManifestError):
    """A version in Redis lacks its manifest or vectors, or they do not match the manifest."""


class LoadFailed(RerankError):
    """Loading a version into Redis failed; the active version was left unchanged."""


class VersionRefused(RerankError):
    """A version command refused its input (the message names it) and changed nothing."""


class NoItemTower(RerankError):
    """No live version can add items: none is active, or none has an item tower."""


class ItemsBusy(RerankError):
    """The item encoder's queue is full."""


class BadItems(RerankError):
    """Items the serving versions cannot read; ``errors`` in the form of FastAPI's 422 list,
    each naming the item."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(str(e["msg"]) for e in errors))
        self.errors = errors


def _text(value: str) -> str:
    """At most ECHO_CHARS characters, encodable as UTF-8 (lone surrogates as ``\\udXXX``)."""
    cut = value[:ECHO_CHARS]
    try:
        cut.encode("utf-8")
    except UnicodeEncodeError:
        cut = cut.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > ECHO_CHARS or len(cut) > ECHO_CHARS:
        cut = cut[:ECHO_CHARS] + "\u2026"
    return cut


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` from its first items, levels and characters.

    JSON has no NaN nor Infinity (a JSON encoder refuses them), and UTF-8 has no lone
    surrogates: Python's JSON parser accepts all of them, so a 422 echoes them as text.
    """
    if isinstance(value, str):
        return _text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return value
        try:
            return _text(str(value))
        except ValueError:  # more digits than str() writes
            return f"an integer of {value.bit_length()} bits"
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if depth >= _DEPTH:
        return "\u2026"
    if isinstance(value, dict):
        items = list(value.items())[:_ITEMS]
        return {_text(str(k)): _plain(v, depth + 1) for k, v in items}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_plain(v, depth + 1) for v in value[:_ITEMS]]
    return _text(str(value))


def _echo(value: Any) -> Any:
    """The input as JSON data, or its JSON text cut to ECHO_CHARS when longer."""
    plain = _plain(value)
    text = json.dumps(plain, ensure_ascii=False)
    return plain if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "\u2026"


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's error list as JSON-safe, bounded data: the first MAX_ERRORS errors."""
    out = []
    for error in errors[:MAX_ERRORS]:
        entry: dict[str, Any] = {
            "type": _text(str(error.get("type", ""))),
            "loc": [_plain(part) for part in error.get("loc", ())],
            "msg": _text(str(error.get("msg", ""))),
        }
        if "input" in error:
            entry["input"] = _echo(error["input"])
        if isinstance(error.get("ctx"), dict):
            entry["ctx"] = _echo(error["ctx"])
            if not isinstance(entry["ctx"], dict):  # cut to text: the schema wants an object
                entry["ctx"] = {"text": entry["ctx"]}
        out.append(entry)
    return out


def install_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Map the error tree to HTTP: 503 for faults the caller can retry, 500 for the rest."""
    retry_after = {"Retry-After": str(retry_after_s)}

    async def unsupported(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {
                "detail": "unsupported media type: send the body as JSON, with the header "
                "Content-Type: application/json"
            },
            status_code=415,
        )

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis's own text (key names, a pipeline's arguments) goes to the log, not to the
        # caller.
        log.warning("503 on %s: %s", request.url.path, exc)
        return JSONResponse(
            {"detail": "unavailable: the store could not serve this request, retry later"},
            status_code=503,
            headers=retry_after,
        )

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return JSONResponse({"detail": validation_errors(errors)}, status_code=422)

    async def bad_items(_: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors if isinstance(exc, BadItems) else []
        return JSONResponse({"detail": validation_errors(errors)}, status_code=422)

    async def no_tower(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    async def busy(_: Request, exc: Exception) -> JSONResponse:
        # The words of the admission gate's overload answer (app/guard.py): one answer.
        return JSONResponse(
            {"detail": "overloaded: retry later"}, status_code=503, headers=retry_after
        )

    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_code=500)

    app.add_exception_handler(UnsupportedMediaType, unsupported)
    app.add_exception_handler(StoreUnavailable, unavailable)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(BadItems, bad_items)
    app.add_exception_handler(NoItemTower, no_tower)
    app.add_exception_handler(ItemsBusy, busy)
    app.add_exception_handler(RerankError, internal)
