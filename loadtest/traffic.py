"""The benchmark's traffic: written once to a file, then read by every load source.

A traffic file is one JSON object::

    {"meta":     {"source": "item-knn over MovieLens-100K" | "popularity-random", ...},
     "users":    {user_id: [item ids of the stored history, oldest first]},
     "recall":   {user_id: [recall candidates, best first, up to meta.max_candidates]},
     "requests": [["r", user_id] | ["e", user_id, [item ids]], ...]}

A request ``["r", u]`` is ``POST /rerank {"user_id": u, "candidates": recall[u][:N], "k": K}``
with N chosen by the reader (50..1000), so one file serves every candidate count. A request
``["e", u, ids]`` is ``POST /events``: the user took one of the items of their list.

Users are drawn with a Zipf-like popularity (rank r has weight 1 / r**s). The recall lists
come from an item-kNN over MovieLens-100K when ``data/ml100k`` exists (the offline recall of
``training/recall.py``); otherwise from a popularity-skewed random draw over the model's
item ids, and the file's ``meta.source`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from contract import default_version

TRAFFIC_DIR = Path(__file__).resolve().parent / "traffic"
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SOURCE_KNN = "item-knn over MovieLens-100K"
SOURCE_RANDOM = "popularity-random"


def zipf_weights(n: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return weights / weights.sum()


def _requests(
    rng: np.random.Generator, users: list[str], recall: dict[str, list[str]], shape: Shape
) -> list[list[Any]]:
    # Popularity rank is a seeded permutation of the users, not their id order.
    order = rng.permutation(len(users))
    weights = zipf_weights(len(users), shape.zipf_s)
    drawn = order[rng.choice(len(users), size=shape.n_requests, p=weights)]
    is_event = rng.random(shape.n_requests) < shape.events_share
    out: list[list[Any]] = []
    for row, event in zip(drawn.tolist(), is_event.tolist(), strict=True):
        user = users[row]
        if event and recall[user]:
            top = recall[user][:10]  # the user took one of the items shown
            out.append(["e", user, [top[int(rng.integers(len(top)))]]])
        else:
            out.append(["r", user])
    return out


@dataclass(frozen=True)
class Shape:
    """What a traffic file is made of, beside its source; its ``meta`` records it."""

    max_candidates: int  # recall candidates kept per user
    history_len: int  # history items per user
    n_requests: int
    zipf_s: float  # how unevenly the requests fall on the users
    events_share: float  # share of the requests that are /events
    seed: int


def build_knn(data_dir: Path, shape: Shape) -> dict[str, Any]:
    """Recall lists from an item-kNN over MovieLens-100K (needs the training extra)."""
    from training.data import load_movielens
    from training.recall import ItemKNN

    ds = load_movielens(data_dir)
    knn = ItemKNN(ds.sequences, ds.n_items)
    rows, scores = knn.recall(ds.sequences, shape.max_candidates)  # (U, n) item rows, best first
    users: dict[str, list[str]] = {}
    recall: dict[str, list[str]] = {}
    for u, user in enumerate(ds.users):
        users[user] = [ds.item_ids[r - 1] for r in ds.sequences[u][-shape.history_len :].tolist()]
        # A user who has seen nearly everything has fewer unseen items than asked for.
        keep = np.isfinite(scores[u])
        recall[user] = [ds.item_ids[r - 1] for r in rows[u][keep].tolist()]
    rng = np.random.default_rng(shape.seed)
    requests = _requests(rng, ds.users, recall, shape)
    meta = {"source": SOURCE_KNN, "n_users": len(users), "n_items": ds.n_items, **asdict(shape)}
    return {"meta": meta, "users": users, "recall": recall, "requests": requests}


def _draw_distinct(
    rng: np.random.Generator, cdf: np.ndarray, n: int, exclude: set[int]
) -> list[int]:
    """``n`` distinct rows drawn by popularity (inverse-CDF sampling, then dedupe)."""
    got: dict[int, None] = {}
    n = min(n, len(cdf) - len(exclude))
    while len(got) < n:
        draw = np.searchsorted(cdf, rng.random(2 * (n - len(got)) + 8), side="right")
        for row in draw.tolist():
            if row < len(cdf) and row not in exclude:
                got[row] = None
                if len(got) == n:
                    break
    return list(got)


def build_random(
    item_ids: Sequence[str], n_users: int, shape: Shape, item_zipf_s: float = 0.9
) -> dict[str, Any]:
    """Histories and candidates drawn by a Zipf-like item popularity: no data set needed."""
    rng = np.random.default_rng(shape.seed)
    rank_to_item = rng.permutation(len(item_ids))
    cdf = np.cumsum(zipf_weights(len(item_ids), item_zipf_s))
    user_ids = [f"u{i}" for i in range(1, n_users + 1)]
    users: dict[str, list[str]] = {}
    recall: dict[str, list[str]] = {}
    for user in user_ids:
        hist = _draw_distinct(rng, cdf, shape.history_len, set())
        cands = _draw_distinct(rng, cdf, shape.max_candidates, set(hist))
        users[user] = [item_ids[rank_to_item[r]] for r in hist]
        recall[user] = [item_ids[rank_to_item[r]] for r in cands]
    requests = _requests(rng, user_ids, recall, shape)
    meta = {
        "source": SOURCE_RANDOM, "n_users": n_users, "n_items": len(item_ids),
        "item_zipf_s": item_zipf_s, **asdict(shape),
    }  # fmt: skip
    return {"meta": meta, "users": users, "recall": recall, "requests": requests}


def write(traffic: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(traffic))
    tmp.replace(path)
    return path


def read(path: Path) -> dict[str, Any]:
    traffic: dict[str, Any] = orjson.loads(path.read_bytes())
    return traffic


def with_features(ids: list[str], names: list[str]) -> list[dict[str, Any]]:
    """Candidates as ``{"id", "features"}`` objects, every name given a value, in the shape
    ``rerank recall`` writes: a ``*_rank`` feature near the list position (each channel a
    little apart), any other (a score) falling with it."""
    out = []
    for pos, item in enumerate(ids):
        feats: dict[str, float] = {}
        for j, name in enumerate(names):
            feats[name] = pos + 1 + j if name.endswith("_rank") else round(1.0 / (pos + 1 + j), 6)
        out.append({"id": item, "features": feats})
    return out


def rerank_body(
    traffic: dict[str, Any],
    user: str,
    n_candidates: int,
    k: int,
    features: list[str] | None = None,
) -> bytes:
    cands: list[Any] = traffic["recall"][user][:n_candidates]
    if features:
        cands = with_features(cands, features)
    return orjson.dumps({"user_id": user, "candidates": cands, "k": k})


def bodies(
    traffic: dict[str, Any],
    n_candidates: int,
    k: int,
    limit: int | None = None,
    features: list[str] | None = None,
) -> list[tuple[str, bytes]]:
    """(path, JSON body) of each request, in file order; ``limit`` caps how many; with
    ``features``, each candidate an ``{"id", "features"}`` object carrying those names."""
    out: list[tuple[str, bytes]] = []
    for req in traffic["requests"][:limit]:
        if req[0] == "e":
            out.append(("/events", orjson.dumps({"user_id": req[1], "item_ids": req[2]})))
        else:
            out.append(("/rerank", rerank_body(traffic, req[1], n_candidates, k, features)))
    return out


def for_replay(
    path: Path | None = None,
    max_candidates: int = 100,
    traffic_dir: Path = TRAFFIC_DIR,
    models_dir: Path = MODELS_DIR,
) -> dict[str, Any]:
    """The traffic to replay: the file named, else the first in ``traffic_dir`` (the bench
    writes them), else a popularity-random draw over the default model's item ids, which a
    fresh clone has while its traffic folder is empty."""
    if path is not None:
        return read(path)
    found = sorted(traffic_dir.glob("*.json"))
    if found:
        return read(found[0])
    version = default_version(models_dir)
    if version is None:
        raise SystemExit(f"no traffic file in {traffic_dir} and no default model in {models_dir}")
    folder = models_dir / version
    history_len = int(orjson.loads((folder / "manifest.json").read_bytes())["history_len"])
    item_ids = (folder / "item_ids.txt").read_text().splitlines()
    return build_random(item_ids, 200, Shape(max_candidates, history_len, 2000, 1.0, 0.02, 0))
