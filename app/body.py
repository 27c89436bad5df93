"""Reading a JSON request body: JSON only (else 415), and every unreadable body a 422.

``JsonRoute`` is the route class of the API's routes. For a route with a body it

- answers 415 to a body sent without ``Content-Type: application/json`` (or a ``+json``
  type): FastAPI would otherwise hand the raw bytes to the model, whose 422 ("a valid
  dictionary") does not say what is wrong;
- parses the body with ``parse_json``, which turns every failure into a ``JSONDecodeError``,
  hence FastAPI's 422 ``json_invalid`` with the position: bytes that are not UTF-8, an
  integer past Python's digit limit, nesting deeper than the parser's recursion limit. Left
  to FastAPI, each of these is a 400 "error parsing the body".

The parser is orjson, three times faster than the standard library's on a body of candidates
with features. A body orjson refuses, or one with a run of 19 digits or more (orjson reads an
integer past 64 bits as a float, which would turn an integer id into a refused float), goes
to the standard library's parser, as FastAPI's would: it
reads ``NaN``, ``Infinity``, ``1e400``, integers past 64 bits and lone surrogates
(``"\\ud800"``) into Python values, so that the models refuse them with a 422 that names the
field; ``app.errors`` renders such input safely.
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.errors import UnsupportedMediaType


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters allowed."""
    if content_type == "application/json":  # nearly every request: no parse for it
        return True
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


# Every digit as "0": a long number shows as a run of zeros, found without a regex (which
# backtracks at every digit of a body of numbers).
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


def parse_json(body: bytes) -> Any:
    """The body as Python values; every failure is a ``json.JSONDecodeError``."""
    if _LONG_NUMBER not in body.translate(_DIGITS):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # not strict JSON: the standard library reads what it can, or says where not
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("not valid UTF-8", "", exc.start) from exc
    except RecursionError as exc:
        raise json.JSONDecodeError("nested too deeply", "", 0) from exc
    except ValueError as exc:  # an integer of more digits than int() takes
        raise json.JSONDecodeError("number too long", "", 0) from exc


class JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """A route whose body, if it has one, must be JSON and is parsed by ``parse_json``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def json_only(request: Request) -> Response:
            if not is_json(request.headers.get("content-type")):
                raise UnsupportedMediaType(request.headers.get("content-type"))
            return await handler(JsonRequest(request.scope, request.receive))

        return json_only
