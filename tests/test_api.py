"""The HTTP contract of docs/api.md, end to end against a real Redis and the exported model."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.schemas import RerankResponse
from tests.conftest import HISTORY_LEN, N_ITEMS, VERSION_A
from tests.reference import Reference, assert_same_ranking


def rerank(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/rerank", json=body)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def test_healthz_readyz_metrics_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "redis": True,
        "model_version": VERSION_A,
        "vectors": True,
        "draining": False,
    }
    rerank(client, user_id="u", candidates=["1", "2"])
    text = client.get("/metrics").text
    for name in (
        "rerank_request_seconds_bucket",
        "rerank_queue_wait_seconds",
        "rerank_batch_size",
        "rerank_model_seconds",
        "rerank_redis_seconds",
        "rerank_cache_hits_total",
        "rerank_cache_misses_total",
        "rerank_missing_vectors_total",
        "rerank_degraded_total",
        "rerank_shed_total",
        "rerank_model_swap_failures_total",
        f'rerank_model_info{{version="{VERSION_A}"}} 1.0',
    ):
        assert name in text, name
    assert 'route="/rerank",status="200"' in text
    schema = client.get("/openapi.json").json()
    assert {"/rerank", "/events", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])


def test_order_matches_the_model_run_directly(
    client: TestClient, references: dict[str, Reference]
) -> None:
    """Many users, stored histories, duplicates and unknown ids: the reference's order."""
    ref = references[VERSION_A]
    rng = random.Random(7)
    for user in range(40):
        uid = f"user{user}"
        history = [str(rng.randint(1, N_ITEMS)) for _ in range(rng.randint(0, 12))]
        if history:
            assert client.post("/events", json={"user_id": uid, "item_ids": history}).is_success
        candidates = [str(rng.randint(1, N_ITEMS + 20)) for _ in range(rng.randint(1, 60))]
        k = rng.randint(1, 30)
        body = rerank(client, user_id=uid, candidates=candidates, k=k)
        assert body["model_version"] == VERSION_A and not body["degraded"]
        scores, _, _, missing = ref.score(history, candidates)
        assert body["missing"] == missing
        assert_same_ranking(body["items"], scores, missing, k)


def test_missing_candidates_rank_last_in_callers_order(client: TestClient) -> None:
    body = rerank(client, user_id="u", candidates=["x9", "3", "x1", "5", "x5"], k=10)
    ids = [i["item_id"] for i in body["items"]]
    assert body["missing"] == ["x9", "x1", "x5"]
    assert ids[2:] == ["x9", "x1", "x5"]
    assert set(ids[:2]) == {"3", "5"}
    assert [i["score"] is None for i in body["items"]] == [False, False, True, True, True]


def test_all_candidates_missing(client: TestClient) -> None:
    body = rerank(client, user_id="u", candidates=["a", "b"], k=5)
    assert [i["item_id"] for i in body["items"]] == ["a", "b"]
    assert body["missing"] == ["a", "b"] and not body["degraded"]


def test_duplicates_dropped_first_kept(
    client: TestClient, references: dict[str, Reference]
) -> None:
    body = rerank(client, user_id="u", candidates=["4", "7", "4", "9", "7"], k=10)
    ids = [i["item_id"] for i in body["items"]]
    assert sorted(ids) == ["4", "7", "9"]
    scores, _, _, _ = references[VERSION_A].score([], ["4", "7", "9"])
    assert_same_ranking(body["items"], scores, [], 10)


def test_empty_history_and_k_larger_than_list(client: TestClient) -> None:
    body = rerank(client, user_id="nobody-yet", candidates=["1", "2", "3"], k=50)
    assert len(body["items"]) == 3
    assert all(isinstance(i["score"], float) for i in body["items"])


def test_integer_ids_mean_decimal_strings(client: TestClient) -> None:
    body = rerank(client, user_id=196, candidates=[1, "2", 3], k=3, history=[4, 5])
    assert body["user_id"] == "196"
    assert sorted(i["item_id"] for i in body["items"]) == ["1", "2", "3"]


def test_integral_floats_are_integer_ids_and_fractions_are_refused(client: TestClient) -> None:
    # JSON Schema counts 2.0 as an integer, and the schema says ids may be integers.
    body = rerank(client, user_id=196.0, candidates=[1.0, "2", 3], k=3, history=[4.0])
    assert body["user_id"] == "196"
    assert sorted(i["item_id"] for i in body["items"]) == ["1", "2", "3"]
    refused = client.post("/rerank", json={"user_id": "u", "candidates": ["1", 2.5]})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "candidates", 1]


def test_request_history_replaces_stored(
    client: TestClient, references: dict[str, Reference]
) -> None:
    client.post("/events", json={"user_id": "h", "item_ids": ["10", "11", "12"]})
    given = ["20", "21", "unknown", "22"]
    body = rerank(client, user_id="h", candidates=["1", "2", "3", "4"], k=4, history=given)
    scores, _, _, _ = references[VERSION_A].score(given, ["1", "2", "3", "4"])
    assert_same_ranking(body["items"], scores, [], 4)


def test_explain_lists_history_by_attention(
    client: TestClient, references: dict[str, Reference]
) -> None:
    history = ["30", "31", "32", "33", "34"]
    cands = ["1", "2", "3", "nope"]
    body = rerank(client, user_id="e", candidates=cands, k=4, history=history, explain=True)
    _, attn, used, _ = references[VERSION_A].score(history, cands)
    present = ["1", "2", "3"]
    for item in body["items"]:
        if item["score"] is None:
            assert item["because"] is None
            continue
        because = item["because"]
        assert len(because) == 3
        weights = [b["weight"] for b in because]
        assert weights == sorted(weights, reverse=True)
        row = attn[present.index(item["item_id"])]
        top = sorted(range(len(used)), key=lambda j: -row[j])[:3]
        assert pytest.approx(weights, abs=1e-4) == [float(row[j]) for j in top]
        assert {b["item_id"] for b in because} <= set(used)
    plain = rerank(client, user_id="e", candidates=cands, k=4, history=history)
    assert all(i["because"] is None for i in plain["items"])


def test_explain_with_empty_history(client: TestClient) -> None:
    body = rerank(client, user_id="new", candidates=["1", "2"], history=[], explain=True)
    assert all(i["because"] == [] for i in body["items"])


def test_answer_is_exactly_the_documented_schema(client: TestClient) -> None:
    """The route serialises plain data itself: its JSON must be what RerankResponse writes."""
    for body in (
        rerank(client, user_id="s", candidates=["1", "2", "x"], k=3),
        rerank(client, user_id="s", candidates=["1", "2"], history=["3"], explain=True),
    ):
        model = RerankResponse.model_validate(body)
        assert body == model.model_dump(mode="json")
    assert (
        client.post("/rerank", json={"user_id": "s", "candidates": ["1"]}).headers["content-type"]
        == "application/json"
    )
    schema = client.get("/openapi.json").json()["paths"]["/rerank"]["post"]["responses"]["200"]
    assert schema["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RerankResponse"
    }


def test_events_append_and_trim(
    client: TestClient, redis_server: EmbeddedRedis, prefix: str
) -> None:
    first = client.post("/events", json={"user_id": "ev", "item_ids": ["1", "2", "3"]})
    assert first.json() == {"user_id": "ev", "history_length": 3}
    more = [str(i) for i in range(4, 14)]
    second = client.post("/events", json={"user_id": "ev", "item_ids": more})
    assert second.json()["history_length"] == HISTORY_LEN
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        stored = r.lrange(f"{prefix}:h:ev", 0, -1)
    finally:
        r.close()
    assert stored == [str(i) for i in range(13, 13 - HISTORY_LEN, -1)]  # newest first


def test_events_are_seen_by_the_next_rerank(
    client: TestClient, references: dict[str, Reference]
) -> None:
    cands = [str(i) for i in range(40, 60)]
    before = rerank(client, user_id="seen", candidates=cands, k=20)
    client.post("/events", json={"user_id": "seen", "item_ids": ["41", "42", "43"]})
    after = rerank(client, user_id="seen", candidates=cands, k=20)
    scores, _, _, _ = references[VERSION_A].score(["41", "42", "43"], cands)
    assert_same_ranking(after["items"], scores, [], 20)
    assert before["items"] != after["items"]


def test_request_id_echoed_or_made(client: TestClient) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz")
    assert len(made.headers["x-request-id"]) == 32
    odd = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert odd.headers["x-request-id"] != "bad id\twith spaces"


GOOD: dict[str, Any] = {"user_id": "u", "candidates": ["1", "2"], "k": 2}
BAD_RERANK = [
    ({"user_id": None}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "x" * 129}, "user_id"),
    ({"user_id": 1.5}, "user_id"),
    ({"user_id": True}, "user_id"),
    ({"user_id": ["u"]}, "user_id"),
    ({"candidates": []}, "candidates"),
    ({"candidates": "1"}, "candidates"),
    ({"candidates": [str(i) for i in range(65)]}, "candidates"),
    ({"candidates": ["1", ""]}, "candidates"),
    ({"candidates": ["1", "y" * 129]}, "candidates"),
    ({"candidates": ["1", None]}, "candidates"),
    ({"candidates": ["1", True]}, "candidates"),
    ({"candidates": ["1", 2.5]}, "candidates"),
    ({"candidates": None}, "candidates"),
    ({"k": 0}, "k"),
    ({"k": -1}, "k"),
    ({"k": 101}, "k"),
    ({"k": "ten"}, "k"),
    ({"k": 2.5}, "k"),
    ({"history": "1"}, "history"),
    ({"history": [""]}, "history"),
    ({"history": [str(i) for i in range(101)]}, "history"),
    ({"explain": "maybe"}, "explain"),
    ({"surprise": 1}, "surprise"),
]


@pytest.mark.parametrize(("patch", "field"), BAD_RERANK)
def test_bad_rerank_input_is_422_naming_the_field(
    client: TestClient, patch: dict[str, Any], field: str
) -> None:
    response = client.post("/rerank", json={**GOOD, **patch})
    assert response.status_code == 422, response.text
    locs = [e["loc"] for e in response.json()["detail"]]
    assert any(loc[:2] == ["body", field] for loc in locs), locs


def test_missing_fields_and_bad_json_are_422(client: TestClient) -> None:
    for body, field in (({"candidates": ["1"]}, "user_id"), ({"user_id": "u"}, "candidates")):
        response = client.post("/rerank", json=body)
        assert response.status_code == 422
        assert ["body", field] in [e["loc"] for e in response.json()["detail"]]
    broken = client.post(
        "/rerank", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u", "item_ids": []}, "item_ids"),
        ({"user_id": "u", "item_ids": [""]}, "item_ids"),
        ({"user_id": "u", "item_ids": [str(i) for i in range(101)]}, "item_ids"),
        ({"user_id": "", "item_ids": ["1"]}, "user_id"),
        ({"item_ids": ["1"]}, "user_id"),
    ],
)
def test_bad_events_input_is_422(client: TestClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/events", json=body)
    assert response.status_code == 422
    assert any(e["loc"][:2] == ["body", field] for e in response.json()["detail"])


def test_no_active_model_is_degraded_not_ready(settings_factory: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_factory())) as c:  # nothing loaded under this prefix
        body = rerank(c, user_id="u", candidates=["3", "1", "3", "2"], k=2)
        assert body["degraded"] and body["model_version"] is None
        assert [i["item_id"] for i in body["items"]] == ["3", "1"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False


def test_request_id_is_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="app.access"):
        client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    lines = [r for r in caplog.records if r.name == "app.access"]
    assert lines and "GET /healthz 200" in lines[-1].getMessage()
    assert lines[-1].request_id == "trace-42"
