"""The naive peer: the reranker as a tutorial would write it, for the benchmark to beat.

One ONNX Runtime run per request, one Redis GET per item, no cache, no batching: a plain
``def`` route (FastAPI runs it in its thread pool) with the synchronous redis-py client. It
reads the same keys as the service and answers the same request and response bodies.

Configured by environment: NAIVE_REDIS_URL, NAIVE_MODEL (a models/<version> folder),
NAIVE_PREFIX (the Redis key prefix, default ``rr``). Run it with
``uvicorn loadtest.peers.naive:app --loop uvloop --http httptools``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort
import redis
from fastapi import FastAPI
from pydantic import BaseModel


class RerankIn(BaseModel):
    user_id: str
    candidates: list[str]
    k: int = 10


class EventsIn(BaseModel):
    user_id: str
    item_ids: list[str]


folder = Path(os.environ.get("NAIVE_MODEL", "models/default"))
prefix = os.environ.get("NAIVE_PREFIX", "rr")
manifest = json.loads((folder / "manifest.json").read_text())
version = manifest["version"]
dim = manifest["dim"]
history_len = manifest["history_len"]
dtype = np.dtype(manifest["vector_dtype"]).newbyteorder("<")
session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
declared = {i.name for i in session.get_inputs()}
# A graph with recall features gets their defaults: the peer's requests are plain ids.
defaults = np.array([f["default"] for f in manifest.get("candidate_features") or []], np.float32)
r = redis.Redis.from_url(os.environ.get("NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0"))

app = FastAPI(title="naive reranker")


def vector(item_id: str) -> np.ndarray | None:
    raw = r.get(f"{prefix}:v:{version}:{item_id}")
    if raw is None:
        return None
    return np.frombuffer(cast(bytes, raw), dtype=dtype).astype(np.float32)


@app.post("/rerank")
def rerank(req: RerankIn) -> dict:
    newest_first = r.lrange(f"{prefix}:h:{req.user_id}", 0, history_len - 1)
    history = [cast(bytes, i).decode() for i in newest_first]
    history.reverse()  # stored newest first
    hist = [v for v in (vector(i) for i in history) if v is not None]
    candidates = list(dict.fromkeys(req.candidates))
    found, vectors, missing = [], [], []
    for position, item_id in enumerate(candidates):
        v = vector(item_id)
        if v is None:
            missing.append(item_id)
        else:
            found.append((position, item_id))
            vectors.append(v)
    items = []
    if vectors:
        n, length = len(vectors), max(len(hist), 1)
        hist_arr = np.zeros((1, length, dim), np.float32)
        hist_mask = np.zeros((1, length), np.bool_)
        if hist:
            hist_arr[0] = np.stack(hist)
            hist_mask[0] = True
        feed = {
            "hist": hist_arr,
            "hist_mask": hist_mask,
            "cand": np.stack(vectors)[None],
            "cand_mask": np.ones((1, n), np.bool_),
        }
        if "cand_rank" in declared:
            feed["cand_rank"] = np.array([[p for p, _ in found]], np.float32)
        if "cand_feats" in declared:
            feed["cand_feats"] = np.tile(defaults, (1, n, 1))
        scores = session.run(["scores"], feed)[0][0]
        for row in np.argsort(-scores, kind="stable")[: req.k]:
            items.append({"item_id": found[row][1], "score": float(scores[row])})
    items += [{"item_id": i, "score": None} for i in missing[: req.k - len(items)]]
    return {
        "user_id": req.user_id,
        "model_version": version,
        "items": items,
        "missing": missing,
        "degraded": False,
    }


@app.post("/events")
def events(req: EventsIn) -> dict:
    key = f"{prefix}:h:{req.user_id}"
    r.lpush(key, *req.item_ids)
    r.ltrim(key, 0, history_len - 1)
    return {"user_id": req.user_id, "history_length": r.llen(key)}


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": bool(r.ping())}
