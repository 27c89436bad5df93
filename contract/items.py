"""The item tower of new items: its ONNX graph, and how an item's raw fields become its inputs.

A model version trained with id dropout carries ``models/<version>/item_tower.onnx`` and an
``item_tower`` section in its manifest (docs/api.md). The graph is the item tower's "cold"
path, what an item without a learned id embedding gets::

    text_vec  (B, 384) float32  the text encoder's vector of the item's text (app/encoder.py)
    attrs     (B, A)   float32  categorical multi-hot columns, then standardised numeric ones
    item_vec  (B, D)   float32  the item's vector, as stored under rr:v:<version>:<item_id>

The section names what turns raw fields into those inputs, exactly as training did
(training/files.py): the categorical attributes in order with the values that have a column,
and per numeric attribute the median that stands for a missing value, then the mean and the
divisor of the standardisation. ``ItemTowerSpec.prepare`` applies it; the exporter, the
offline cold vectors, ``POST /items`` and ``rerank items add`` all go through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TOWER_FILE = "item_tower.onnx"
TEXT_VEC = "text_vec"
ATTRS = "attrs"
ITEM_VEC = "item_vec"
TOWER_INPUTS = (TEXT_VEC, ATTRS)
TOWER_OUTPUTS = (ITEM_VEC,)
TOWER_DYNAMIC_AXES: dict[str, dict[int, str]] = {
    TEXT_VEC: {0: "B"},
    ATTRS: {0: "B"},
    ITEM_VEC: {0: "B"},
}
VALUE_SEPARATOR = "|"  # several values of a categorical attribute in one text


class BadAttribute(ValueError):
    """An attribute's value cannot be read; ``name`` is the attribute."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def item_text(text: str, categorical: Sequence[tuple[str, Sequence[str]]]) -> str:
    """What the sentence encoder reads: the text, then each categorical attribute's values,
    "Toy Story (1995). Genres: Animation, Children's, Comedy."."""
    parts = [f"{name[:1].upper()}{name[1:]}: {', '.join(values)}"
             for name, values in categorical if values]  # fmt: skip
    if not parts:
        return text
    return ". ".join([text, *parts] if text else parts) + "."


def categorical_values(name: str, value: Any) -> list[str]:
    """A categorical attribute's values: a text (split on ``|``, as a file's cell), a list of
    texts, or null (none); blanks dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(VALUE_SEPARATOR) if v.strip()]
    if isinstance(value, list | tuple):
        bad = [i for i, v in enumerate(value) if not isinstance(v, str)]
        if bad:
            raise BadAttribute(name, f"value {bad[0]} is not a string")
        return [v.strip() for v in value if v.strip()]
    raise BadAttribute(name, "must be a string or a list of strings (a categorical attribute)")


def numeric_value(name: str, value: Any) -> float | None:
    """A numeric attribute's value: a finite number, or null (missing)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAttribute(name, "must be a number or null (a numeric attribute)")
    try:
        number = float(value)
    except OverflowError:
        raise BadAttribute(name, "must be a finite number") from None
    if not math.isfinite(number):
        raise BadAttribute(name, "must be a finite number")
    return number


@dataclass(frozen=True)
class Categorical:
    name: str
    values: tuple[str, ...]  # the values with a multi-hot column, in column order


@dataclass(frozen=True)
class Numeric:
    name: str
    median: float  # stands for a missing value
    mean: float  # the column is (x - mean) / std
    std: float  # the divisor: the standard deviation plus 1e-6, never 0


@dataclass(frozen=True)
class Prepared:
    """One item as the tower's inputs: the text to encode and its attribute row."""

    text: str
    attrs: np.ndarray  # (A,) float32
    ignored: tuple[str, ...]  # attribute names this tower does not read


@dataclass(frozen=True)
class ItemTowerSpec:
    """The manifest's ``item_tower`` section, checked."""

    file: str
    text_dim: int
    dim: int
    text_encoder_sha256: str
    categorical: tuple[Categorical, ...]
    numeric: tuple[Numeric, ...]

    @property
    def width(self) -> int:
        """A: the columns of ``attrs``."""
        return sum(len(c.values) for c in self.categorical) + len(self.numeric)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(c.name for c in self.categorical) | {n.name for n in self.numeric}

    def prepare(self, text: str, attributes: Mapping[str, Any]) -> Prepared:
        """The item's text as the encoder reads it and its attribute row; raises
        ``BadAttribute`` for a value of the wrong kind. Names this tower does not read are
        returned in ``ignored``."""
        row = np.zeros(self.width, dtype=np.float64)
        parts = []
        offset = 0
        for c in self.categorical:
            values = categorical_values(c.name, attributes.get(c.name))
            parts.append((c.name, values))
            column = {v: j for j, v in enumerate(c.values)}
            for v in values:
                j = column.get(v)
                if j is not None:
                    row[offset + j] = 1.0
            offset += len(c.values)
        for n in self.numeric:
            x = numeric_value(n.name, attributes.get(n.name))
            row[offset] = ((n.median if x is None else x) - n.mean) / n.std
            offset += 1
        ignored = tuple(sorted(k for k in attributes if k not in self.names))
        return Prepared(item_text(text, parts), row.astype(np.float32), ignored)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": list(TOWER_INPUTS),
            "outputs": list(TOWER_OUTPUTS),
            "text_dim": self.text_dim,
            "dim": self.dim,
            "text_encoder_sha256": self.text_encoder_sha256,
            "categorical": [{"name": c.name, "values": list(c.values)} for c in self.categorical],
            "numeric": [
                {"name": n.name, "median": n.median, "mean": n.mean, "std": n.std}
                for n in self.numeric
            ],
        }

    @classmethod
    def from_dict(cls, data: object) -> ItemTowerSpec:
        """Check a decoded section; ``ValueError`` names the field."""
        if not isinstance(data, dict):
            raise ValueError(f"must be an object, got {type(data).__name__}")
        for key in ("file", "text_encoder_sha256"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"{key} must be a non-empty string, got {data.get(key)!r}")
        for key in ("text_dim", "dim"):
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        expected: tuple[tuple[str, tuple[str, ...]], ...] = (
            ("inputs", TOWER_INPUTS),
            ("outputs", TOWER_OUTPUTS),
        )
        for key, graph_names in expected:
            if data.get(key, list(graph_names)) != list(graph_names):
                raise ValueError(f"{key} must be {list(graph_names)}, got {data.get(key)!r}")
        categorical = tuple(_categorical(c, i) for i, c in enumerate(_list(data, "categorical")))
        numeric = tuple(_numeric(n, i) for i, n in enumerate(_list(data, "numeric")))
        names = [c.name for c in categorical] + [n.name for n in numeric]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"attributes {twice} are named twice")
        return cls(
            file=data["file"],
            text_dim=data["text_dim"],
            dim=data["dim"],
            text_encoder_sha256=data["text_encoder_sha256"],
            categorical=categorical,
            numeric=numeric,
        )


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list, got {value!r}")
    return value


def _entry(entry: object, where: str) -> tuple[str, dict[str, Any]]:
    """An attribute's entry, and its name."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ValueError(f"{where} must be an object with a non-empty name")
    return entry["name"], entry


def _categorical(entry: object, i: int) -> Categorical:
    name, fields = _entry(entry, f"categorical[{i}]")
    values = fields.get("values")
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"categorical[{i}] ({name}): values must be a list of non-empty strings")
    if len(set(values)) != len(values):
        raise ValueError(f"categorical[{i}] ({name}): values repeat")
    return Categorical(name, tuple(values))


def _numeric(entry: object, i: int) -> Numeric:
    name, fields = _entry(entry, f"numeric[{i}]")
    got = {}
    for key in ("median", "mean", "std"):
        value = fields.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"numeric[{i}] ({name}): {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"numeric[{i}] ({name}): {key} must be finite, got {value!r}")
        got[key] = float(value)
    if got["std"] <= 0:
        raise ValueError(f"numeric[{i}] ({name}): std must be positive, got {got['std']!r}")
    return Numeric(name, got["median"], got["mean"], got["std"])
