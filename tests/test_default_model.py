"""The shipped default model (models/DEFAULT): the service's order equals model.onnx's.

Skipped until the trained default model is committed; the same check runs on the random
test models in test_api.py meanwhile.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from contract import default_version
from tests.reference import Reference, assert_same_ranking

MODELS = Path(__file__).resolve().parents[1] / "models"
VERSION = default_version(MODELS) if MODELS.is_dir() else None


@pytest.mark.slow
@pytest.mark.skipif(VERSION is None, reason="no default model in models/ yet")
def test_default_model_order_for_many_users(
    redis_server: EmbeddedRedis, prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    assert VERSION is not None
    folder = MODELS / VERSION
    load_into_redis(redis_server.url, folder, prefix)
    ref = Reference(folder)
    ids = list(ref.vectors)
    rng = random.Random(11)
    settings = settings_factory(model_dir=MODELS, max_candidates=200, max_history=200)
    with TestClient(create_app(settings)) as client:
        for user in range(100):
            history = rng.sample(ids, rng.randint(0, 60))
            cands = rng.sample(ids, rng.randint(1, 150)) + ["not-an-item"]
            k = rng.choice([1, 10, 50, 100])
            uid = f"default-{user}"
            if history:
                client.post("/events", json={"user_id": uid, "item_ids": history})
            body = client.post("/rerank", json={"user_id": uid, "candidates": cands, "k": k})
            assert body.status_code == 200, body.text
            data = body.json()
            assert data["model_version"] == VERSION and not data["degraded"]
            scores, _, _, missing = ref.score(history, cands)
            assert_same_ranking(data["items"], scores, missing, k)
