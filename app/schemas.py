"""Request and response bodies of the HTTP API (see docs/api.md).

The list and k limits come from the settings, so the request models are built per app by
``request_models``: the limits then show in the OpenAPI schema, and a violation is an
ordinary 422 whose ``loc`` names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic.json_schema import WithJsonSchema

from app.config import Settings

MAX_ID_LENGTH = 128


def _int_to_str(value: Any) -> Any:
    # An integer id means its decimal string; bool is an int in Python but never an id.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _ints_to_str(value: Any) -> Any:
    # The same for a whole list in one call: a request carries hundreds of ids, and a Python
    # validator per id was most of the validation's time. Anything else is left for the
    # item schema to refuse, with the item's index in the error.
    if isinstance(value, list):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
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


class RerankRequest(_Strict):
    user_id: Id
    candidates: IdList = Field(min_length=1, description="Recall's candidates, best first.")
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
    user_id: Id
    item_ids: IdList = Field(min_length=1, description="Items the user saw, oldest first.")


def request_models(settings: Settings) -> tuple[type[RerankRequest], type[EventsRequest]]:
    """Subclasses of ``RerankRequest`` and ``EventsRequest`` with this app's limits.

    Their class names, ``Rerank`` and ``Events``, are their names in the OpenAPI schema.
    """

    class Rerank(RerankRequest):
        candidates: IdList = Field(min_length=1, max_length=settings.max_candidates)
        k: JsonInt = Field(default=10, ge=1, le=settings.max_k)
        history: IdList | None = Field(default=None, max_length=settings.max_history)

    class Events(EventsRequest):
        item_ids: IdList = Field(min_length=1, max_length=settings.max_history)

    return Rerank, Events


class Because(BaseModel):
    item_id: str
    weight: float


class RankedItem(BaseModel):
    item_id: str
    score: float | None = Field(description="Model score; null when not scored.")
    because: list[Because] | None = Field(
        default=None, description="With explain: the history items it attended to most."
    )


class RerankResponse(BaseModel):
    user_id: str
    model_version: str | None
    items: list[RankedItem]
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
    user_id: str
    history_length: int


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    redis: bool
    model_version: str | None
    vectors: bool
    draining: bool = Field(default=False, description="True: shutting down, send no more.")


class ErrorDetail(BaseModel):
    detail: str
