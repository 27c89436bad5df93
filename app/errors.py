"""The service's exceptions, and their one mapping to HTTP.

::

    RerankError                  base of everything the service raises on purpose
    ├── StoreUnavailable         Redis down, slow, or past the request deadline
    │                              /rerank: fail open (200, degraded); elsewhere 503
    ├── Overloaded               the batch queue or the in-flight limit is full: 503 + Retry-After
    ├── Unauthorized             no API key, or a wrong one: 401
    ├── ModelError               ONNX Runtime failed to load or to run a model
    ├── ManifestMismatch         what Redis holds of a version does not match its manifest
    └── LoadFailed               `rerank load` could not write or verify a version in Redis

    contract.ManifestError       a model folder or manifest breaks the model contract
    └── ManifestMismatch         (both: one ``except ManifestError`` catches every mismatch)

Routes never catch broadly: the handlers below turn these into responses in one place.
A model folder is checked at start-up, at a swap and by `rerank load`, never in a route.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from contract import ManifestError


class RerankError(Exception):
    """Base of the service's own errors."""


class StoreUnavailable(RerankError):
    """Redis did not answer in time or refused the connection."""


class Overloaded(RerankError):
    """The batch queue is full; the caller should retry later."""


class Unauthorized(RerankError):
    """The request carries no API key, or one that is not configured."""


class ModelError(RerankError):
    """ONNX Runtime could not load or run the model."""


class ManifestMismatch(RerankError, ManifestError):
    """A version in Redis lacks its manifest or vectors, or they do not match the manifest."""


class LoadFailed(RerankError):
    """Loading a version into Redis failed; the active version was left unchanged."""


def install_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Map the error tree to HTTP: 503 for faults the caller can retry, 500 for the rest."""

    async def overloaded(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": "overloaded: the request queue is full, retry later"},
            status_code=503,
            headers={"Retry-After": str(retry_after_s)},
        )

    async def unauthorized(_: Request, exc: Exception) -> JSONResponse:
        # The message never repeats what the caller sent: a key must not be echoed or logged.
        return JSONResponse(
            {"detail": "unauthorized: send a valid API key in X-API-Key or Authorization"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="rerank"'},
        )

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"unavailable: {exc}"}, status_code=503)

    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_code=500)

    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(StoreUnavailable, unavailable)
    app.add_exception_handler(RerankError, internal)
