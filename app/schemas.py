"""Request and response bodies of the HTTP API (docs/api.md, and /docs).

The list and k limits come from the settings, so the request models are built per app by
``request_models``: the limits then show in the OpenAPI schema, and a violation is an
ordinary 422 whose ``loc`` names the field.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Annotated, Any, TypedDict

import numpy as np
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from app.config import Settings

MAX_ID_LENGTH = 128


def _int_to_str(value: Any) -> Any:
    # An integer id means its decimal string; bool is an int in Python but never an id. A
    # float with no fraction is an integer to JSON Schema (2.0), so it means "2" as well.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value


def _ints_to_str(value: Any) -> Any:
    # The same for a whole list: a request carries hundreds of ids, and most are strings, so
    # only the others pay for the call. Anything else is left for the item schema to
    # refuse, with the item's index in the error.
    if isinstance(value, list):
        return [v if isinstance(v, str) else _int_to_str(v) for v in value]
    return value


# The length limits sit on the str schema itself (checked in pydantic-core); the int-to-str
# step wraps it, so it runs first.
_IdStr = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
_ID_JSON_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
            {"type": "integer"},
        ]
    }
)
Id = Annotated[_IdStr, BeforeValidator(_int_to_str), _ID_JSON_SCHEMA]
IdList = Annotated[list[Annotated[_IdStr, _ID_JSON_SCHEMA]], BeforeValidator(_ints_to_str)]


# A feature value must stay finite as the float32 the model reads.
FLOAT32_MAX = 3.4028234663852886e38


class Candidates(list[str]):
    """Candidate ids in the caller's order, with what recall said about each:
    ``features[i]`` is candidate i's ``{name: value}`` (empty for a plain id). A plain list
    of ids, without the attribute, is what a request of ids only gives."""

    features: list[dict[str, float]]


_NO_FEATURES: dict[str, float] = {}


def _candidate_error(i: int, ident: Any, rule: str) -> PydanticCustomError:
    shown = repr(ident) if len(repr(ident)) <= 40 else repr(ident)[:37] + "..."
    return PydanticCustomError(
        "candidate", "candidate {index} (id {id}): {rule}", {"index": i, "id": shown, "rule": rule}
    )


def _features(i: int, ident: Any, features: dict[str, Any]) -> None:
    """One candidate's features, each value checked: the error names the candidate and the
    feature."""
    for name, value in features.items():
        if type(value) is int:
            if abs(value) > FLOAT32_MAX:
                raise _candidate_error(i, ident, f"feature {name!r} is not a finite number")
        elif type(value) is float:
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise _candidate_error(i, ident, f"feature {name!r} is not a finite number")
        else:
            raise _candidate_error(
                i, ident, f"feature {name!r} is not a number, got {type(value).__name__}"
            )


def _all_finite(features: list[dict[str, float]]) -> bool:
    """Whether every value of every candidate's features is an int or float within float32's
    range: one array check for the whole request instead of a Python check per value."""
    values = list(chain.from_iterable(named.values() for named in features))
    if not set(map(type, values)) <= {int, float}:
        return False
    try:
        array = np.array(values, np.float64)
    except OverflowError:  # an int past float64
        return False
    return bool(np.all(np.abs(array) <= FLOAT32_MAX))  # NaN compares False


def _candidates(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Ids and ``{"id", "features"}`` objects, mixed: the objects' ids are validated with
    the plain ones (an error's ``loc`` is the candidate's index), their features here."""
    if not isinstance(value, list) or not any(type(v) is dict for v in value):
        return handler(value)  # ids only: the plain list, as fast as before
    ids: list[Any] = []
    features: list[dict[str, float]] = []
    for i, v in enumerate(value):
        if type(v) is dict:
            if "id" not in v or not v.keys() <= {"id", "features"}:
                raise _candidate_error(
                    i, v.get("id"), f'an object holds "id" and "features", got keys {list(v)}'
                )
            named = v.get("features", _NO_FEATURES)
            if type(named) is not dict:
                raise _candidate_error(i, v["id"], "features must be an object of name: number")
            ids.append(v["id"])
            features.append(named)
        else:
            ids.append(v)
            features.append(_NO_FEATURES)
    if not _all_finite(features):  # find the first bad value, to name it
        for i, (v, named) in enumerate(zip(value, features, strict=True)):
            _features(i, v["id"] if type(v) is dict else v, named)
    out = Candidates(handler(ids))
    out.features = features
    return out


_CANDIDATE_JSON_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
            {"type": "integer"},
            {
                "type": "object",
                "properties": {
                    "id": {
                        "anyOf": [
                            {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
                            {"type": "integer"},
                        ]
                    },
                    "features": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "number",
                            "minimum": -FLOAT32_MAX,
                            "maximum": FLOAT32_MAX,
                        },
                    },
                },
                "required": ["id"],
                "additionalProperties": False,
            },
        ]
    }
)
CandidateList = Annotated[
    list[Annotated[_IdStr, _CANDIDATE_JSON_SCHEMA]],
    BeforeValidator(_ints_to_str),
    WrapValidator(_candidates),
]


def _json_integer(value: Any) -> Any:
    # What JSON Schema calls an integer: 3 and 3.0, but not true or "3", which pydantic's
    # lax mode would take.
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class _Strict(BaseModel):
    # Unknown fields are typos of the caller: refuse them rather than ignore them.
    model_config = ConfigDict(extra="forbid")


# Examples in the OpenAPI schema: MovieLens-100K ids (user 196 and films they rated).
_USER_ID = "The user's id: a string of 1 to 128 characters, or an integer (its decimal string)."


class RerankRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"user_id": "196", "candidates": ["242", "302", "377", "51", "346"], "k": 3},
                {
                    "user_id": "196",
                    "candidates": ["242", "302", "377"],
                    "history": ["257", "288", "294"],
                    "explain": True,
                },
            ]
        }
    )

    user_id: Id = Field(description=_USER_ID)
    candidates: CandidateList = Field(
        min_length=1,
        description="Recall's candidates, best first: item ids (strings, or integers for "
        'their decimal strings), or objects {"id": ..., "features": {"name": number}} '
        "with what recall knows of the candidate (the two forms mix); duplicates are "
        "dropped, the first kept.",
    )
    k: JsonInt = Field(default=10, ge=1, description="How many items to return.")
    history: IdList | None = Field(
        default=None,
        description="The caller's recent item ids, oldest first; replaces the "
        "stored history when given.",
    )
    explain: bool = Field(
        default=False, strict=True, description="Add the history items behind each score."
    )


class EventsRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"user_id": "196", "item_ids": ["242", "302"]}]}
    )

    user_id: Id = Field(description=_USER_ID)
    item_ids: IdList = Field(min_length=1, description="Items the user saw, oldest first.")


def request_models(settings: Settings) -> tuple[type[RerankRequest], type[EventsRequest]]:
    """Subclasses of ``RerankRequest`` and ``EventsRequest`` with this app's limits.

    Their class names, ``Rerank`` and ``Events``, are their names in the OpenAPI schema.
    """

    rerank, events = RerankRequest.model_fields, EventsRequest.model_fields

    class Rerank(RerankRequest):
        candidates: CandidateList = Field(
            min_length=1,
            max_length=settings.max_candidates,
            description=rerank["candidates"].description,
        )
        k: JsonInt = Field(default=10, ge=1, le=settings.max_k, description=rerank["k"].description)
        history: IdList | None = Field(
            default=None,
            max_length=settings.max_history,
            description=rerank["history"].description,
        )

    class Events(EventsRequest):
        item_ids: IdList = Field(
            min_length=1,
            max_length=settings.max_history,
            description=events["item_ids"].description,
        )

    return Rerank, Events


MAX_TEXT_CHARS = 10_000  # an item's text; the encoder reads its first 256 word pieces
MAX_ATTRIBUTES = 100  # attributes of one item
# An attribute's value as JSON gives it: a text or a list of texts (categorical), a finite
# number (numeric), or null (none, or missing). Which kind an attribute must be is the model's
# (its manifest's item_tower), checked when the item is read.
AttributeValue = (
    StrictStr | StrictInt | Annotated[StrictFloat, AllowInfNan(False)] | list[StrictStr] | None
)
_AttributeName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class NewItemBody(_Strict):
    item_id: Id = Field(description="The new item's id: a string of 1 to 128 characters, or an "
                        "integer (its decimal string).")  # fmt: skip
    text: str = Field(
        default="",
        max_length=MAX_TEXT_CHARS,
        description="What the text encoder reads first, e.g. the title; may be empty.",
    )
    attributes: dict[_AttributeName, AttributeValue] = Field(
        default_factory=dict,
        max_length=MAX_ATTRIBUTES,
        description="The item's attributes by name, as in the training items file: a "
        "categorical one as a list of texts (or one text, `|` separating values), a numeric "
        "one as a number; null or absent: none (numeric: the training median). Names the "
        "model does not read are ignored and listed in the answer.",
    )


class ItemsRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "item_id": "new-1",
                            "text": "Space Station 2049 (1998)",
                            "attributes": {"genres": ["Sci-Fi"], "year": 1998},
                        }
                    ]
                }
            ]
        }
    )

    items: list[NewItemBody] = Field(min_length=1, description="The items to add.")


def items_request_model(settings: Settings) -> type[ItemsRequest]:
    """``ItemsRequest`` with this app's limit on items per call; named ``Items`` in OpenAPI."""

    class Items(ItemsRequest):
        items: list[NewItemBody] = Field(
            min_length=1,
            max_length=settings.max_items_per_call,
            description=ItemsRequest.model_fields["items"].description,
        )

    return Items


class ItemsResponse(BaseModel):
    added: list[str] = Field(
        description="Items whose vector was written under at least one version, in the order sent.",
        examples=[["new-1"]],
    )
    existing: list[str] = Field(
        description="Items that had a vector under every version already: never replaced.",
        examples=[[]],
    )
    versions: list[str] = Field(
        description="The live versions with an item tower, under which vectors were written.",
        examples=[["ml100k-20250101-000000"]],
    )
    ignored_attributes: list[str] = Field(
        description="Attribute names sent that no live version reads.", examples=[[]]
    )


class Because(BaseModel):
    item_id: str = Field(description="A history item.", examples=["257"])
    weight: float = Field(
        description="Its attention weight for the scored item, 0 to 1.", examples=[0.41]
    )


class RankedItem(BaseModel):
    item_id: str = Field(description="A candidate's id, as a string.", examples=["302"])
    score: float | None = Field(description="Model score; null when not scored.")
    because: list[Because] | None = Field(
        default=None, description="With explain: the history items it attended to most."
    )


class RerankResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "196",
                    "model_version": "20250101-000000",
                    "items": [
                        {"item_id": "302", "score": 2.71, "because": None},
                        {"item_id": "242", "score": 1.94, "because": None},
                        {"item_id": "51", "score": None, "because": None},
                    ],
                    "missing": ["51"],
                    "degraded": False,
                }
            ]
        }
    )

    user_id: str = Field(description="The user's id, as a string.")
    model_version: str | None = Field(
        description="The model version that scored the items; null when none did."
    )
    items: list[RankedItem] = Field(
        description="The top k: scored candidates by score, then the missing ones."
    )
    missing: list[str] = Field(description="Candidates without a vector, ranked last.")
    degraded: bool = Field(description="True: the caller's order, the model could not run.")


# The /rerank answer as plain data, what the route serialises with orjson. Same fields as the
# models above, which stay the documented schema (the route's response_model): building a
# pydantic model per item and having FastAPI validate the whole answer again cost more CPU
# than the rest of the route.
class BecauseAnswer(TypedDict):
    item_id: str
    weight: float


class RankedItemAnswer(TypedDict):
    item_id: str
    score: float | None
    because: list[BecauseAnswer] | None


class RerankAnswer(TypedDict):
    user_id: str
    model_version: str | None
    items: list[RankedItemAnswer]
    missing: list[str]
    degraded: bool


class EventsResponse(BaseModel):
    user_id: str = Field(description="The user's id, as a string.", examples=["196"])
    history_length: int = Field(
        description="Items in the stored history after the append (trimmed to the model's "
        "history length).",
        examples=[2],
    )


class Health(BaseModel):
    status: str = Field(description="Always ok: the process answers.", examples=["ok"])


class Readiness(BaseModel):
    ready: bool = Field(description="True: Redis answers, a model and its vectors are loaded.")
    redis: bool = Field(description="Redis answered a ping.")
    model_version: str | None = Field(description="The active model version; null when none.")
    vectors: bool = Field(description="The active version's vectors are in Redis.")
    draining: bool = Field(default=False, description="True: shutting down, send no more.")


class ErrorDetail(BaseModel):
    detail: str = Field(
        description="What went wrong, in plain words.",
        examples=["overloaded: too many requests in flight, retry later"],
    )
