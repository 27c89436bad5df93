"""Request bodies: JSON only (415), every unreadable or refused body a 422 that renders.

Python's JSON parser reads NaN, Infinity, 1e400 and lone surrogates; the answer to each is a
422 naming the field, never a 500 from an error page that cannot be encoded. What a 422
repeats of the input is bounded, and the OpenAPI schema says what the routes really send.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.errors import ECHO_CHARS, MAX_ERRORS, validation_errors
from app.factory import create_app

JSON = {"content-type": "application/json"}


def post(client: TestClient, path: str, raw: bytes, headers: dict[str, str] = JSON) -> Any:
    return client.post(path, content=raw, headers=headers)


def assert_422_naming(response: Any, *loc: str | int) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    response.content.decode("utf-8")  # valid UTF-8, valid JSON
    errors: list[dict[str, Any]] = json.loads(response.content)["detail"]
    assert any(e["loc"][: len(loc) + 1] == ["body", *loc] for e in errors), errors
    return errors


# Raw bodies, since a JSON encoder would refuse to write most of them.
NON_FINITE = [
    (b'{"user_id": "u", "candidates": ["1"], "k": NaN}', ("k",)),
    (b'{"user_id": "u", "candidates": ["1"], "k": Infinity}', ("k",)),
    (b'{"user_id": "u", "candidates": ["1"], "k": -Infinity}', ("k",)),
    (b'{"user_id": "u", "candidates": ["1"], "k": 1e400}', ("k",)),
    (b'{"user_id": NaN, "candidates": ["1"]}', ("user_id",)),
    (b'{"user_id": "u", "candidates": ["1", NaN]}', ("candidates", 1)),
    (b'{"user_id": "u", "candidates": ["1"], "history": [1e400]}', ("history", 0)),
    (b'{"user_id": "u", "candidates": ["1"], "explain": NaN}', ("explain",)),
    (b'{"user_id": "u", "candidates": ["1"], "note": {"a": [NaN, -Infinity]}}', ("note",)),
]
SURROGATES = [
    (b'{"user_id": "\\ud800", "candidates": ["1"]}', ("user_id",)),
    (b'{"user_id": "u\\udfff", "candidates": ["1"]}', ("user_id",)),
    (b'{"user_id": "u", "candidates": ["1", "\\ud800"]}', ("candidates", 1)),
    (b'{"user_id": "u", "candidates": ["1"], "history": ["\\ud800"]}', ("history", 0)),
    (b'{"user_id": "u", "candidates": ["1"], "x": "\\ud800"}', ("x",)),
    (b'{"user_id": "u", "candidates": ["1"], "\\ud800": 1}', ()),  # a key: the body's error
]


@pytest.mark.parametrize(("raw", "loc"), NON_FINITE + SURROGATES)
def test_non_finite_numbers_and_lone_surrogates_are_422_naming_the_field(
    client: TestClient, raw: bytes, loc: tuple[str | int, ...]
) -> None:
    assert_422_naming(post(client, "/rerank", raw), *loc)


def test_events_refuse_them_too(client: TestClient) -> None:
    raw = b'{"user_id": "u", "item_ids": ["1", "\\ud800", NaN]}'
    errors = assert_422_naming(post(client, "/events", raw), "item_ids", 1)
    assert ["body", "item_ids", 2] in [e["loc"] for e in errors]
    assert_422_naming(
        post(client, "/events", b'{"user_id": Infinity, "item_ids": ["1"]}'), "user_id"
    )


def test_the_echo_of_a_refused_value_is_json_text(client: TestClient) -> None:
    raw = b'{"user_id": "\\ud800", "candidates": ["1"], "k": NaN}'
    errors = {e["loc"][1]: e for e in json.loads(post(client, "/rerank", raw).content)["detail"]}
    assert errors["k"]["input"] == "NaN"
    assert errors["user_id"]["input"] == "\\ud800"  # the escape, as text


def test_a_large_invalid_body_is_not_echoed_whole(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    with TestClient(create_app(settings_factory(max_history=1000))) as client:
        long_string = {"user_id": "u", "candidates": "x" * 1_000_000}
        response = client.post("/rerank", json=long_string)
        assert response.status_code == 422 and len(response.content) < 2_000
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "candidates"]
        assert len(error["input"]) <= ECHO_CHARS + 1

        too_many = {"user_id": "u", "candidates": [str(i) for i in range(100_000)]}
        response = client.post("/rerank", json=too_many)
        assert response.status_code == 422 and len(response.content) < 2_000

        every_item_wrong = {"user_id": "u", "candidates": ["1"], "history": [None] * 1000}
        response = client.post("/rerank", json=every_item_wrong)
        assert response.status_code == 422 and len(response.content) < 20_000
        assert len(response.json()["detail"]) == MAX_ERRORS

        long_name = {"user_id": "u", "candidates": ["1"], "y" * 500_000: 1}
        response = client.post("/rerank", json=long_name)
        assert response.status_code == 422 and len(response.content) < 2_000


def test_validation_errors_render_anything() -> None:
    errors = [
        {
            "type": "t",
            "loc": ("body", "\ud800" * 1000, 2**70),
            "msg": "m",
            "input": {"a": [float("nan"), {"b": {"c": {"d": {"e": 1}}}}], "\udc00": 10**5000},
            "ctx": {"error": ValueError("bad"), "limit": float("inf")},
        }
    ] * (MAX_ERRORS + 5)
    rendered = validation_errors(errors)
    assert len(rendered) == MAX_ERRORS
    text = json.dumps(rendered, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert len(text) < MAX_ERRORS * 1_000
    assert rendered[0]["ctx"] == {"error": "bad", "limit": "Infinity"}


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": "\xff\xfe", "candidates": ["1"]}',  # not UTF-8
        b'{"user_id": "u", "candidates": [' + b"1" * 5000 + b"]}",  # past int()'s digit limit
        b'{"user_id": "u", "candidates": ["1"], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"{not json",
        b"",
    ],
    ids=["utf8", "digits", "depth", "syntax", "empty"],
)
def test_unreadable_bodies_are_422_never_400(client: TestClient, raw: bytes) -> None:
    response = post(client, "/rerank", raw)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}],
    ids=["none", "text", "form"],
)
def test_a_body_that_is_not_json_is_415(client: TestClient, headers: dict[str, str]) -> None:
    raw = b'{"user_id": "u", "candidates": ["1"]}'
    for path in ("/rerank", "/events"):
        response = post(client, path, raw, headers)
        assert response.status_code == 415, response.text
        assert "application/json" in response.json()["detail"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/x+json"])
def test_json_content_types_with_parameters_or_suffix_pass(
    client: TestClient, content_type: str
) -> None:
    raw = b'{"user_id": "u", "candidates": ["1"]}'
    assert post(client, "/rerank", raw, {"content-type": content_type}).status_code == 200


def test_the_schema_lists_what_is_sent(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/rerank", "/events"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "400" not in responses  # every unreadable body is a 422
        assert {"200", "413", "415", "422", "503"} <= set(responses)
        assert responses["503"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}


def test_the_schema_has_examples_and_descriptions(client: TestClient) -> None:
    components = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("Rerank", "Events", "RerankResponse", "EventsResponse", "Readiness"):
        model = components[name]
        for field, spec in model["properties"].items():
            assert spec.get("description"), f"{name}.{field}"
    for name in ("Rerank", "Events", "RerankResponse"):
        examples = components[name]["examples"]
        assert examples and "string" not in json.dumps(examples), name
    rerank = components["Rerank"]["examples"][0]
    assert rerank["user_id"] == "196" and rerank["candidates"][0] == "242"


def test_the_examples_are_valid_requests(client: TestClient) -> None:
    components = client.get("/openapi.json").json()["components"]["schemas"]
    for name, path in (("Rerank", "/rerank"), ("Events", "/events")):
        for example in components[name]["examples"]:
            response = client.post(path, json=example)
            assert response.status_code == 200, response.text


def test_the_fast_parser_and_the_fallback_read_alike() -> None:
    """orjson reads a strict body; a long integer and a non-strict body go to the standard
    library, so an integer id stays an integer and NaN reaches the models."""
    from app.body import parse_json

    assert parse_json(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    big = parse_json(b"[30149597730309732230605307904, -9999999999999999999]")
    assert big == [30149597730309732230605307904, -9999999999999999999]
    assert all(type(v) is int for v in big)
    nan = parse_json(b'{"x": NaN}')["x"]
    assert nan != nan
