"""The service's exceptions, and their one mapping to HTTP.

::

    RerankError                  base of everything the service raises on purpose
    ├── StoreUnavailable         Redis down, slow, or past the request deadline
    │                              /rerank: fail open (200, degraded); elsewhere 503
    ├── ModelError               ONNX Runtime failed to load or to run a model
    ├── ManifestMismatch         a model folder or Redis manifest does not match its files
    └── LoadFailed               `rerank load` could not write or verify a version in Redis

Routes never catch broadly: the handlers below turn these into responses in one place.
Answers given before a request reaches the routes (401 without a valid API key, 408 and 413
for the body, 503 for overload) come from app/guard.py, rendered once at start-up.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class RerankError(Exception):
    """Base of the service's own errors."""


class StoreUnavailable(RerankError):
    """Redis did not answer in time or refused the connection."""


class ModelError(RerankError):
    """ONNX Runtime could not load or run the model."""


class ManifestMismatch(RerankError):
    """A model's manifest does not match its files, its vectors or the Redis copy."""


class LoadFailed(RerankError):
    """Loading a version into Redis failed; the active version was left unchanged."""


def install_handlers(app: FastAPI) -> None:
    """Map the error tree to HTTP: 503 for faults the caller can retry, 500 for the rest."""

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"unavailable: {exc}"}, status_code=503)

    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_code=500)

    app.add_exception_handler(StoreUnavailable, unavailable)
    app.add_exception_handler(RerankError, internal)
