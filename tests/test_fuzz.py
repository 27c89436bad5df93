"""Fuzzing: every endpoint against the app's own OpenAPI schema, and /rerank's properties.

schemathesis generates requests from /openapi.json (valid and invalid ones) and checks every
answer: no 5xx, a status the schema documents, a body that matches the schema. hypothesis
then checks the ranking rules of docs/api.md on random candidate lists. Both stay small
(max_examples) so the suite stays fast; the deadline is off since a shared CPU is slow.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python import asgi

from app.config import Settings
from app.factory import create_app
from tests.conftest import N_ITEMS

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run: a failure is reproducible
)


@pytest.fixture(autouse=True)
def ieee_floats() -> None:
    """Training tests run in the same process turn flush-denormal on (training.train's
    set_seed), a processor state under which hypothesis refuses to draw floats, which the
    schema has (candidate features)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


@pytest.fixture
def fuzz_app(loaded: str, settings_factory: Callable[..., Settings]) -> Iterator[FastAPI]:
    # Two items a call keep the largest body the schema allows (texts of 10,000 characters,
    # six bytes each escaped) under the body limit: past it the answer is a 413, which is no
    # verdict on the body's fields.
    app = create_app(settings_factory(max_items_per_call=2))
    yield app
    asgi.shutdown_lifespans()  # schemathesis ran the lifespan: end it with the test


MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_every_endpoint_keeps_to_its_schema(fuzz_app: FastAPI, mode: GenerationMode) -> None:
    # The schema's operations are walked here rather than with schemathesis' pytest plugin,
    # whose fixture loader does not run on this pytest.
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert paths == {"/rerank", "/events", "/items", "/healthz", "/readyz", "/metrics"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters and no body: nothing can be made invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @FUZZ
        def check(case: Any) -> None:
            response = case.call_and_validate()
            assert response.status_code < 500, response.text

        check()


def test_the_limits_are_in_the_schema(client: TestClient) -> None:
    body = client.get("/openapi.json").json()["components"]["schemas"]
    rerank = next(v for k, v in body.items() if k.startswith("Rerank") and "k" in v["properties"])
    props = rerank["properties"]
    assert props["candidates"]["maxItems"] == 64 and props["k"]["maximum"] == 100
    assert props["history"]["anyOf"][0]["maxItems"] == 100
    assert props["user_id"]["anyOf"][0]["maxLength"] == 128


def test_body_larger_than_the_limit_is_413(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    with TestClient(create_app(settings_factory(max_body_bytes=1000))) as client:
        small = {"user_id": "u", "candidates": ["1", "2"]}
        assert client.post("/rerank", json=small).status_code == 200
        big = {"user_id": "u", "candidates": [str(i) for i in range(300)]}
        assert client.post("/rerank", json=big).status_code == 413

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
            yield b'{"user_id": "u", "candidates": ['
            for i in range(300):
                yield f'"{i}",'.encode()
            yield b'"0"]}'

        response = client.post("/rerank", content=chunked())
        assert response.status_code == 413 and "1000 bytes" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200  # GET without a body passes


def test_each_limit_is_a_422_naming_its_field(client: TestClient) -> None:
    cases = {
        "candidates": {"user_id": "u", "candidates": ["1"] * 65},
        "k": {"user_id": "u", "candidates": ["1"], "k": 101},
        "history": {"user_id": "u", "candidates": ["1"], "history": ["1"] * 101},
        "user_id": {"user_id": "u" * 129, "candidates": ["1"]},
    }
    for field, body in cases.items():
        response = client.post("/rerank", json=body)
        assert response.status_code == 422, field
        assert any(field in err["loc"] for err in response.json()["detail"]), field
    events = client.post("/events", json={"user_id": "u", "item_ids": ["x" * 129]})
    assert events.status_code == 422


# Known ids (with a vector) and unknown ones, some as integers, with duplicates.
ids = st.one_of(
    st.integers(1, N_ITEMS + 30),
    st.integers(1, N_ITEMS + 30).map(str),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=8),
)
requests = st.fixed_dictionaries(
    {
        "user_id": st.sampled_from(["p1", "p2", "p3"]),
        "candidates": st.lists(ids, min_size=1, max_size=64),
        "k": st.integers(1, 100),
    },
    optional={"history": st.lists(ids, max_size=12), "explain": st.booleans()},
)


@given(body=requests)
@FUZZ
def test_rerank_properties(client: TestClient, body: dict[str, Any]) -> None:
    first = client.post("/rerank", json=body)
    assert first.status_code == 200, first.text
    answer = first.json()
    sent = list(dict.fromkeys(str(c) for c in body["candidates"]))
    got = [i["item_id"] for i in answer["items"]]
    assert not answer["degraded"]
    assert set(got) <= set(sent) and len(got) == len(set(got))  # a subset, no duplicates
    assert len(got) == min(body["k"], len(sent))
    scored = [i["score"] for i in answer["items"] if i["score"] is not None]
    assert scored == sorted(scored, reverse=True)
    assert all(i["score"] is None for i in answer["items"][len(scored) :])  # scored first
    assert answer["missing"] == [c for c in sent if c in set(answer["missing"])]
    assert got[len(scored) :] == answer["missing"][: len(got) - len(scored)]
    second = client.post("/rerank", json=body)
    assert second.json() == answer  # identical input, identical answer
