"""Floor 3, HTTP alone: the service's server stack and bodies around an endpoint that does
nothing.

The same uvicorn (uvloop, httptools), FastAPI, the service's own request models
(``app.schemas``: the same validation of the same request bodies) and the same response
serialisation (plain data through orjson, as ``app.api``); the handler returns the first k
candidates with a constant score instead of reading Redis and running the model. Run it with
``uvicorn loadtest.peers.nothing:app --loop uvloop --http httptools``.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Response

from app.config import Settings
from app.schemas import EventsResponse, RerankResponse, request_models

settings = Settings(_env_file=None)  # type: ignore[call-arg]
RerankBody, EventsBody = request_models(settings)

app = FastAPI(title="http floor")


@app.post("/rerank", response_model=RerankResponse)
async def rerank(body: RerankBody) -> Response:  # type: ignore[valid-type]
    candidates = list(dict.fromkeys(body.candidates))  # type: ignore[attr-defined]
    answer: dict[str, Any] = {
        "user_id": body.user_id,  # type: ignore[attr-defined]
        "model_version": "floor",
        "items": [{"item_id": i, "score": 0.0, "because": None} for i in candidates[: body.k]],  # type: ignore[attr-defined]
        "missing": [],
        "degraded": False,
    }
    return Response(orjson.dumps(answer), media_type="application/json")


@app.post("/events")
async def events(body: EventsBody) -> EventsResponse:  # type: ignore[valid-type]
    return EventsResponse(user_id=body.user_id, history_length=0)  # type: ignore[attr-defined]


@app.get("/readyz")
async def readyz() -> dict[str, bool]:
    return {"ready": True}
