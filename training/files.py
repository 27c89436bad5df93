"""Your own data: an interaction log and an item catalogue in files, checked, as a ``Dataset``.

The contract (docs/data.md):

- formats by extension: ``.csv`` (UTF-8, a header row; ``.csv.gz`` too) and ``.parquet``;
- interactions: ``user_id``, ``item_id``, ``timestamp`` (epoch seconds, integer or float, or
  ISO 8601 text); other columns are ignored, and the summary says so. Per user, time order;
  file order where timestamps tie;
- items: ``item_id`` and ``text`` (may be empty); every other column is an attribute: numbers
  are numeric, text is categorical, several values in one cell separated by ``|``;
- ids are text, always: ``00042`` and ``42`` are two items; 1 to 128 characters, no line
  breaks (``item_ids.txt`` holds one id a line).

Every problem is found before anything is trained and reported as one line that names the
file, the column, the line of the file (the header is line 1; a parquet file has rows) or
the id, and what to do. ``read_dataset`` raises ``DataProblems`` with all of them.
"""

from __future__ import annotations

import csv
import gzip
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contract import sha256_file
from contract.items import Categorical, Numeric
from contract.items import item_text as item_text  # shared with the service
from training.data import DataError, Dataset

MAX_ID_LENGTH = 128  # as the service's request schema (app/schemas.py)
MIN_INTERACTIONS = 3  # leave-last-out takes a test and a validation item and needs one more
MAX_SHOWN = 5  # lines shown per kind of problem in one column; the rest are counted
MAX_VALUES = 128  # categorical values kept per attribute: the most common
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "text")
FORMATS = (".csv", ".csv.gz", ".parquet")
# Characters that str.splitlines() breaks on: an id holding one would split in item_ids.txt.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAK_RE = "[" + re.escape(LINE_BREAKS) + "]"
# A number as text; "007" is a code, not a number, and "nan"/"inf" are not numbers here.
_NUMBER = re.compile(r"^[+-]?(?:0|[1-9]\d*)(?:\.\d*)?(?:[eE][+-]?\d+)?$|^[+-]?\.\d+$")


class DataProblems(DataError):
    """The files break the contract; ``lines`` holds one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Attribute:
    name: str
    kind: str  # "categorical" or "numeric"
    values: list[list[str]] | np.ndarray  # per item: its values; or float64 with NaN missing


@dataclass
class Catalogue:
    item_ids: list[str]
    texts: list[str]
    attributes: list[Attribute] = field(default_factory=list)


@dataclass
class Interactions:
    users: np.ndarray  # (n,) object, external user ids, in file order
    items: np.ndarray  # (n,) object, external item ids
    times: np.ndarray  # (n,) float64 epoch seconds


@dataclass
class _Table:
    """One file read into columns: text (object arrays) for csv, arrow types for parquet."""

    path: Path
    columns: dict[str, Any]
    n_rows: int
    parquet: bool
    _lines: np.ndarray | None = None

    @property
    def name(self) -> str:
        return str(self.path)

    def where(self, row: int) -> str:
        if self.parquet:
            return f"row {row + 1}"
        if self._lines is None:
            self._lines = _csv_line_numbers(self.path)
        return f"line {int(self._lines[row])}" if row < len(self._lines) else f"line {row + 2}"


def _open_text(path: Path) -> Any:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def _csv_line_numbers(path: Path) -> np.ndarray:
    """The line on which each data row starts (header = line 1), blank lines skipped as the
    reader skips them; a quoted cell may span lines. Read only when a problem is reported."""
    starts = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        end = 0
        for i, record in enumerate(reader):
            start, end = end + 1, reader.line_num
            if i and record:
                starts.append(start)
    return np.array(starts, dtype=np.int64)


def _ragged_rows(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """The header's width, and (line, cells) of each row with more cells than it."""
    rows = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        width = len(next(reader, []))
        end = reader.line_num
        for record in reader:
            start, end = end + 1, reader.line_num
            if len(record) > width:
                rows.append((start, len(record)))
    return width, rows


def _format(path: Path) -> str | None:
    name = path.name.lower()
    return next((f for f in FORMATS if name.endswith(f)), None)


def _quote(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


class _Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.notes: list[str] = []  # not problems: said in the summary

    def add(self, line: str) -> None:
        self.lines.append(line)

    def rows(
        self,
        table: _Table,
        column: str,
        rows: np.ndarray,
        what: Callable[[int], str],
        todo: str,
    ) -> None:
        """One line per offending row, the first ``MAX_SHOWN``; then one line for the rest."""
        for r in rows[:MAX_SHOWN]:
            self.add(
                f"{table.name}: {table.where(int(r))}, column {column}: {what(int(r))}; {todo}"
            )
        rest = rows[MAX_SHOWN:]
        if len(rest):
            at = ", ".join(table.where(int(r)) for r in rest[:MAX_SHOWN])
            self.add(
                f"{table.name}: column {column}: {len(rest)} more rows like these "
                f"({at}{', ...' if len(rest) > MAX_SHOWN else ''}); {todo}"
            )


def _read(path: Path, report: _Report) -> _Table | None:
    """Read one file, or report why it cannot be read and return None."""
    if not path.exists():
        report.add(f"{path}: no such file; check the path")
        return None
    if not path.is_file():
        report.add(f"{path}: not a file; give the path of a .csv, .csv.gz or .parquet file")
        return None
    fmt = _format(path)
    if fmt is None:
        report.add(
            f"{path}: unknown format {''.join(path.suffixes) or '(no extension)'}; "
            "write it as .csv, .csv.gz or .parquet"
        )
        return None
    if path.stat().st_size == 0:
        report.add(f"{path}: empty file; write a header row and at least one data row")
        return None
    if fmt == ".parquet":
        return _read_parquet(path, report)
    return _read_csv(path, report)


def _read_csv(path: Path, report: _Report) -> _Table | None:
    import pandas as pd

    try:
        # Every cell as text, exactly: no number parsing ("00042" stays), no NA guessing
        # ("NA" and "null" are ids like any other), and never the first column as an index
        # (pandas' reading of rows with one cell more than the header).
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False,
                             encoding="utf-8-sig", index_col=False)  # fmt: skip
    except (pd.errors.ParserError, pd.errors.ParserWarning):
        width, rows = _ragged_rows(path)
        for line, cells in rows[:MAX_SHOWN]:
            report.add(
                f"{path}: line {line}: {cells} cells where the header has {width}; quote "
                "cells that hold commas, and give every row as many cells as the header"
            )
        if len(rows) > MAX_SHOWN:
            report.add(f"{path}: {len(rows) - MAX_SHOWN} more rows with more cells than the header")
        return None
    except pd.errors.EmptyDataError:
        report.add(f"{path}: empty file (no header row); write a header row and the data")
        return None
    except UnicodeDecodeError as exc:
        report.add(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8")
        return None
    except (OSError, EOFError) as exc:  # a corrupt .gz among them
        report.add(f"{path}: cannot be read ({exc}); check that it is a .csv or gzip'd .csv")
        return None
    columns = {str(c): df[c].fillna("").to_numpy(dtype=object) for c in df.columns}
    return _Table(path, columns, len(df), parquet=False)


def _read_parquet(path: Path, report: _Report) -> _Table | None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        report.add(f"{path}: not a readable parquet file ({exc}); write it with pandas or pyarrow")
        return None
    columns = {name: table.column(name) for name in table.column_names}
    return _Table(path, columns, table.num_rows, parquet=True)


def _missing_columns(table: _Table, required: Sequence[str], report: _Report) -> bool:
    missing = [c for c in required if c not in table.columns]
    for c in missing:
        near = [h for h in table.columns if h.strip().lower() == c]
        hint = f"rename {near[0]!r} to {c!r}" if near else f"add a column named {c!r}"
        have = ", ".join(repr(h) for h in list(table.columns)[:10])
        report.add(f"{table.name}: column {c} is missing (the header has {have}); {hint}")
    return bool(missing)


def _ids(table: _Table, column: str, report: _Report) -> np.ndarray | None:
    """The column as text ids (object array), or None when its type cannot hold ids."""
    values = table.columns[column]
    if table.parquet:
        import pyarrow as pa

        kind = values.type
        if pa.types.is_dictionary(kind):
            values, kind = values.cast(kind.value_type), kind.value_type
        if pa.types.is_integer(kind):
            values = values.cast(pa.string())
        elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            report.add(
                f"{table.name}: column {column} has type {kind}; write ids as strings (or "
                "integers): a float column turns 42 into 42.0"
            )
            return None
        values = np.array(["" if v is None else v for v in values.to_pylist()], dtype=object)
    return values


def _check_ids(table: _Table, column: str, ids: np.ndarray, report: _Report) -> None:
    import pandas as pd

    s = pd.Series(ids, dtype=object).astype(str)
    length = s.str.len().to_numpy()
    report.rows(table, column, np.flatnonzero(length == 0), lambda r: "empty id",
                f"give every row an id of 1 to {MAX_ID_LENGTH} characters")  # fmt: skip
    report.rows(
        table, column, np.flatnonzero(length > MAX_ID_LENGTH),
        lambda r: f"id {_quote(ids[r])} is {len(ids[r])} characters long",
        f"ids are 1 to {MAX_ID_LENGTH} characters; shorten it (a hash of it will do)",
    )  # fmt: skip
    breaks = s.str.contains(_LINE_BREAK_RE, regex=True).to_numpy()
    report.rows(
        table, column, np.flatnonzero(breaks),
        lambda r: f"id {ids[r]!r} holds a line break", "remove line breaks from ids",
    )  # fmt: skip


def _times(table: _Table, report: _Report) -> np.ndarray:
    """Epoch seconds (float64); NaN where unreadable, reported."""
    import pandas as pd

    raw = table.columns["timestamp"]
    if table.parquet:
        import pyarrow as pa

        kind = raw.type
        if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
            when = pd.to_datetime(raw.to_pandas(), utc=True)
            seconds = (when - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
            text = np.array([str(v) for v in raw.to_pylist()], dtype=object)
            return _report_times(table, np.asarray(seconds, dtype=np.float64), text, report)
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            seconds = raw.to_pandas().to_numpy(dtype=np.float64, na_value=np.nan)
            text = np.array([str(v) for v in raw.to_pylist()], dtype=object)
            return _report_times(table, seconds, text, report)
        raw = np.array(["" if v is None else str(v) for v in raw.cast(pa.string()).to_pylist()],
                       dtype=object)  # fmt: skip
    text = pd.Series(raw, dtype=object).astype(str).str.strip()
    seconds = np.array(pd.to_numeric(text, errors="coerce"), dtype=np.float64)  # a copy
    other = np.flatnonzero(~np.isfinite(seconds) & (text != "").to_numpy())
    if len(other):
        when = pd.to_datetime(text.iloc[other], format="ISO8601", utc=True, errors="coerce")
        epoch = (when - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        seconds[other] = epoch.to_numpy(dtype=np.float64, na_value=np.nan)
    return _report_times(table, seconds, raw, report)


def _report_times(
    table: _Table, seconds: np.ndarray, text: np.ndarray, report: _Report
) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(seconds))
    report.rows(
        table, "timestamp", bad,
        lambda r: f"{_quote(str(text[r]))} is neither epoch seconds nor ISO 8601 time"
        if str(text[r]).strip() not in ("", "None", "nan", "NaT") else "no timestamp",
        "write epoch seconds (e.g. 1714564800) or ISO 8601 (e.g. 2024-05-01T12:00:00Z)",
    )  # fmt: skip
    return seconds


def _attribute(table: _Table, name: str, report: _Report) -> Attribute | None:
    """An items column as a numeric or categorical attribute; None when it is empty."""
    raw = table.columns[name]
    if table.parquet:
        import pyarrow as pa

        kind = raw.type
        if pa.types.is_dictionary(kind):
            raw, kind = raw.cast(kind.value_type), kind.value_type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            values = raw.cast(pa.float64()).to_pandas().to_numpy(dtype=np.float64, na_value=np.nan)
            return Attribute(name, "numeric", values) if np.isfinite(values).any() else None
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            cells = [[str(v).strip() for v in (c or []) if v is not None and str(v).strip()]
                     for c in raw.to_pylist()]  # fmt: skip
            return Attribute(name, "categorical", cells) if any(cells) else None
        raw = np.array(["" if v is None else str(v) for v in raw.cast(pa.string()).to_pylist()],
                       dtype=object)  # fmt: skip
    text = [str(v).strip() for v in raw]
    filled = [t for t in text if t]
    if not filled:
        report.notes.append(f"{table.name}: column {name} is empty in every row; not used")
        return None
    if all(_NUMBER.match(t) for t in filled):
        return Attribute(name, "numeric", np.array([float(t) if t else np.nan for t in text]))
    cells = [[v.strip() for v in t.split("|") if v.strip()] for t in text]
    return Attribute(name, "categorical", cells)


def read_files(interactions: Path, items: Path | None) -> tuple[Interactions, Catalogue, list[str]]:
    """Read and check both files; raise ``DataProblems`` naming every problem found.

    Returns the interactions, the catalogue and notes for the summary (ignored columns...).
    Without ``items`` the catalogue is the items of the interactions, in order of first
    appearance, without text or attributes.
    """
    report = _Report()
    inter = _read(interactions, report)
    cat = _read(items, report) if items is not None else None
    if inter is not None and inter.n_rows == 0:
        report.add(f"{inter.name}: a header but no rows; add the interactions")
        inter = None
    if cat is not None and cat.n_rows == 0:
        report.add(f"{cat.name}: a header but no rows; add the items")
        cat = None
    if inter is not None and _missing_columns(inter, INTERACTION_COLUMNS, report):
        inter = None
    if cat is not None and _missing_columns(cat, ITEM_COLUMNS, report):
        cat = None

    catalogue = _catalogue(cat, report) if cat is not None else None

    log = None
    if inter is not None:
        extra = [c for c in inter.columns if c not in INTERACTION_COLUMNS]
        if extra:
            names = ", ".join(extra)
            report.notes.append(f"{inter.name}: columns {names} are ignored (only "
                                f"{', '.join(INTERACTION_COLUMNS)} are read)")  # fmt: skip
        users = _ids(inter, "user_id", report)
        item_ids = _ids(inter, "item_id", report)
        times = _times(inter, report)
        if users is not None:
            _check_ids(inter, "user_id", users, report)
        if item_ids is not None:
            _check_ids(inter, "item_id", item_ids, report)
            if catalogue is not None and items is not None:
                _check_known(inter, item_ids, catalogue, items, report)
        if users is not None and item_ids is not None:
            log = Interactions(users, item_ids, times)
            if items is None:
                import pandas as pd

                seen = [str(i) for i in pd.unique(pd.Series(item_ids, dtype=object))]
                catalogue = Catalogue(seen, [""] * len(seen), [])
    if report.lines:
        raise DataProblems(report.lines)
    assert log is not None and catalogue is not None
    return log, catalogue, report.notes


def _catalogue(cat: _Table, report: _Report) -> Catalogue | None:
    ids = _ids(cat, "item_id", report)
    if ids is None:
        return None
    _check_ids(cat, "item_id", ids, report)
    _check_unique(cat, ids, report)
    raw_text = cat.columns["text"]
    if cat.parquet:
        raw_text = [("" if v is None else str(v)) for v in raw_text.to_pylist()]
    attributes = [
        a for c in cat.columns if c not in ITEM_COLUMNS
        if (a := _attribute(cat, c, report)) is not None
    ]  # fmt: skip
    texts = [str(t) for t in raw_text]
    return Catalogue([str(i) for i in ids], texts, attributes)


def read_items(items: Path) -> Catalogue:
    """Read and check an items file alone (``rerank items add``); raise ``DataProblems``
    naming every problem found, as ``read_files`` does."""
    report = _Report()
    cat = _read(items, report)
    if cat is not None and cat.n_rows == 0:
        report.add(f"{cat.name}: a header but no rows; add the items")
        cat = None
    if cat is not None and _missing_columns(cat, ITEM_COLUMNS, report):
        cat = None
    catalogue = _catalogue(cat, report) if cat is not None else None
    if report.lines:
        raise DataProblems(report.lines)
    assert catalogue is not None
    return catalogue


def _check_unique(table: _Table, ids: np.ndarray, report: _Report) -> None:
    import pandas as pd

    s = pd.Series(ids, dtype=object)
    dup = np.flatnonzero(s.duplicated().to_numpy() & (s.str.len() > 0).to_numpy())
    if len(dup):
        first = {v: i for i, v in reversed(list(enumerate(ids)))}
        report.rows(
            table, "item_id", dup,
            lambda r: f"id {_quote(ids[r])} again (first at {table.where(first[ids[r]])})",
            "item ids must be unique: merge the rows or drop one",
        )  # fmt: skip


def _check_known(
    table: _Table, item_ids: np.ndarray, catalogue: Catalogue, items: Path, report: _Report
) -> None:
    import pandas as pd

    unknown = np.flatnonzero(~pd.Index(item_ids).isin(catalogue.item_ids))
    unknown = unknown[[len(str(item_ids[r])) > 0 for r in unknown]]  # empty ids said already
    if not len(unknown):
        return
    first: dict[str, int] = {}
    for r in unknown:
        first.setdefault(item_ids[r], int(r))
    shown = ", ".join(f"{_quote(i)} ({table.where(r)})" for i, r in list(first.items())[:MAX_SHOWN])
    more = ", ..." if len(first) > MAX_SHOWN else ""
    report.add(
        f"{table.name}: column item_id: {len(unknown)} interactions name {len(first)} items "
        f"that are not in {items}: {shown}{more}; add those items to {items.name} or drop "
        "their interactions (ids are text: '00042' and '42' differ)"
    )


def _categorical_block(
    attrs: list[Attribute], n_items: int
) -> tuple[np.ndarray, list[str], list[str], list[Categorical]]:
    """Multi-hot of the values on at least two items, the ``MAX_VALUES`` most common per
    attribute: a value on one item says no more than that item's id embedding."""
    from collections import Counter

    columns: list[np.ndarray] = []
    names: list[str] = []
    notes: list[str] = []
    specs: list[Categorical] = []
    for a in attrs:
        cells: list[list[str]] = a.values  # type: ignore[assignment]
        counts = Counter(v for cell in cells for v in set(cell))
        ranked = sorted((v for v, c in counts.items() if c >= 2), key=lambda v: (-counts[v], v))
        kept = ranked[:MAX_VALUES]
        col_of = {v: j for j, v in enumerate(kept)}
        block = np.zeros((n_items, len(kept)), dtype=np.float32)
        for i, cell in enumerate(cells):
            for v in cell:
                if v in col_of:
                    block[i, col_of[v]] = 1.0
        columns.append(block)
        names += [f"{a.name}={v}" for v in kept]
        specs.append(Categorical(a.name, tuple(kept)))
        dropped = len(counts) - len(kept)
        notes.append(f"{a.name}: categorical, {len(kept)} values"
                     + (f" ({dropped} more on one item each or past the {MAX_VALUES} most "
                        "common: not used)" if dropped else ""))  # fmt: skip
    matrix = np.concatenate(columns, axis=1) if columns else np.zeros((n_items, 0), np.float32)
    return matrix, names, notes, specs


def _numeric_block(
    attrs: list[Attribute], n_items: int
) -> tuple[np.ndarray, list[str], list[str], list[Numeric]]:
    columns, names, notes, specs = [], [], [], []
    for a in attrs:
        x = np.asarray(a.values, dtype=np.float64).copy()
        missing = ~np.isfinite(x)
        median = float(np.median(x[~missing]))
        x[missing] = median
        # The exact float64 values used here go to the manifest (contract/items.py), so that
        # a new item's column is computed with the same operations.
        spec = Numeric(a.name, median, float(x.mean()), float(x.std() + 1e-6))
        columns.append((x - spec.mean) / spec.std)
        specs.append(spec)
        names.append(a.name)
        notes.append(f"{a.name}: numeric" + (f", {int(missing.sum())} missing (set to the median)"
                                             if missing.any() else ""))  # fmt: skip
    matrix = np.stack(columns, axis=1) if columns else np.zeros((n_items, 0))
    return matrix.astype(np.float32), names, notes, specs


def build_dataset(
    name: str,
    log: Interactions,
    catalogue: Catalogue,
    notes: Sequence[str] = (),
    source: dict[str, Any] | None = None,
    say: Callable[[str], None] | None = print,
) -> Dataset:
    """A ``Dataset`` from checked interactions and catalogue; prints a summary via ``say``.

    Users with fewer than ``MIN_INTERACTIONS`` interactions are left out (and counted).
    """
    import pandas as pd

    n_items = len(catalogue.item_ids)
    rows = pd.Index(catalogue.item_ids).get_indexer(log.items) + 1  # item rows, 1-based
    codes, uniques = pd.factorize(pd.Series(log.users, dtype=object), sort=False)
    # Per user (in order of first appearance), time order; the row order breaks ties.
    order = np.lexsort((np.arange(len(codes)), log.times, codes))
    counts = np.bincount(codes, minlength=len(uniques))
    ends = np.cumsum(counts)[:-1]
    all_seqs = np.split(rows[order].astype(np.int64), ends)
    all_times = np.split(log.times[order], ends)
    keep = np.flatnonzero(counts >= MIN_INTERACTIONS)
    if not len(keep):
        raise DataProblems([
            f"{(source or {}).get('interactions', 'interactions')}: no user has "
            f"{MIN_INTERACTIONS} or more interactions; leave-last-out needs a test item, a "
            "validation item and one to learn from per user"
        ])  # fmt: skip
    categorical_attrs = [a for a in catalogue.attributes if a.kind == "categorical"]
    numeric_attrs = [a for a in catalogue.attributes if a.kind == "numeric"]
    cat, cat_names, cat_notes, cat_specs = _categorical_block(categorical_attrs, n_items)
    num, num_names, num_notes, num_specs = _numeric_block(numeric_attrs, n_items)
    texts = [
        item_text(t, [(a.name, a.values[i]) for a in categorical_attrs])  # type: ignore[misc]
        for i, t in enumerate(catalogue.texts)
    ]
    ds = Dataset(
        name=name,
        item_ids=list(catalogue.item_ids),
        texts=texts,
        users=[str(uniques[u]) for u in keep],
        sequences=[all_seqs[u] for u in keep],
        times=[all_times[u] for u in keep],
        categorical=cat,
        categorical_names=cat_names,
        numeric=num,
        numeric_names=num_names,
        categorical_specs=cat_specs,
        numeric_specs=num_specs,
        source=source or {},
    )
    if say is not None:
        left_out = len(uniques) - len(keep)
        lengths = np.array([len(s) for s in ds.sequences])
        n_inter = int(lengths.sum())
        lines = [
            f"data {name}: {len(ds.users)} users, {n_items} items, {n_inter} interactions "
            f"(density {n_inter / (len(ds.users) * n_items):.4%}), median history "
            f"{float(np.median(lengths)):g}",
        ]
        if left_out:
            lines.append(
                f"  {left_out} users with fewer than {MIN_INTERACTIONS} interactions left out "
                f"({int(counts[counts < MIN_INTERACTIONS].sum())} interactions)"
            )
        attrs = cat_notes + num_notes
        lines.append("  attributes: " + ("; ".join(attrs) if attrs else "none"))
        lines += [f"  {n}" for n in notes]
        for line in lines:
            say(line)
    return ds


def dataset_name(path: Path) -> str:
    """A version-friendly name: the folder that holds the file."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().parent.name).strip("-.")
    return name or "data"


def read_dataset(
    interactions: Path,
    items: Path,
    name: str | None = None,
    say: Callable[[str], None] | None = print,
) -> Dataset:
    """Read, check and summarise the two files; ``DataProblems`` lists what is wrong."""
    log, catalogue, notes = read_files(interactions, items)
    source = {
        "interactions": str(interactions),
        "items": str(items),
        "sha256": {"interactions": sha256_file(interactions), "items": sha256_file(items)},
    }
    return build_dataset(name or dataset_name(interactions), log, catalogue, notes, source, say)


def write_files(out: Path, log: Interactions, catalogue: Catalogue) -> tuple[Path, Path]:
    """``out/interactions.csv`` and ``out/items.csv`` in the contract's format."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    times = log.times
    as_int = np.all(np.isfinite(times)) and np.all(times == np.round(times))
    inter = pd.DataFrame({
        "user_id": log.users,
        "item_id": log.items,
        "timestamp": times.astype(np.int64) if as_int else times,
    })  # fmt: skip
    items: dict[str, Any] = {"item_id": catalogue.item_ids, "text": catalogue.texts}
    for a in catalogue.attributes:
        if a.kind == "categorical":
            items[a.name] = ["|".join(cell) for cell in a.values]  # type: ignore[union-attr]
        else:
            x = np.asarray(a.values, dtype=np.float64)
            whole = np.all(x[np.isfinite(x)] == np.round(x[np.isfinite(x)]))
            items[a.name] = [
                "" if not np.isfinite(v) else (str(int(v)) if whole else repr(float(v))) for v in x
            ]
    paths = out / "interactions.csv", out / "items.csv"
    inter.to_csv(paths[0], index=False)
    pd.DataFrame(items).to_csv(paths[1], index=False)
    return paths
