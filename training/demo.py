"""The demo page's sample users: ``models/<version>/demo.json``, written from MovieLens.

    python -m training.demo --model models/<version> [--data-dir data] [--users 196,186]

For a few users it writes what the page at ``/demo`` needs to show a reranking without any
stored state: the user's history (the newest ``history_len`` items, oldest first), the
candidate list the project's own recall (item-kNN on the training split, as in
``training.pipeline.prepare``) made for that history, best first, and the film the user
watched next; and the title and genres of every item those lists name. The lists are the
offline test lists of the pipeline: history = training items + validation item, the held-out
next film is the test item.

The output is deterministic (same data, same model folder, same users: same bytes), so a
test can rebuild it and compare with the committed file. It needs the training extra (scipy
for the recall) and MovieLens in ``--data-dir`` (fetched on first use, never committed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from contract import DEMO_FILE, read_item_ids, read_manifest
from training.data import GENRES, Dataset, fetch_movielens, load_movielens
from training.recall import ItemKNN
from training.split import leave_last_out

# User 196 is the README's example user; the others are drawn with a fixed seed.
FIRST_USER = "196"
N_USERS = 5
MIN_HISTORY = 20  # a user the page shows needs a history worth reading
SEED = 0
K = 10  # the page's top k


def title_of(text: str) -> str:
    """The MovieLens title out of an item text, "Toy Story (1995). Genres: ..." -> title."""
    return text.rsplit(". Genres: ", 1)[0]


def pick_users(dataset: Dataset, first: str, n: int, seed: int) -> list[str]:
    """``first``, then ``n - 1`` others with at least MIN_HISTORY films, in a seeded order."""
    if first not in dataset.users:
        raise ValueError(f"--users: user {first!r} is not in {dataset.name}")
    eligible = sorted(
        (u for u, s in zip(dataset.users, dataset.sequences, strict=True) if len(s) >= MIN_HISTORY),
        key=int,
    )
    others = [u for u in eligible if u != first]
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(others), size=min(n - 1, len(others)), replace=False)
    return [first, *(others[i] for i in drawn)]


def genres_of(dataset: Dataset, row: int) -> list[str]:
    """The item's values of the categorical attribute ``genres``, in MovieLens's order."""
    on = dataset.categorical[row] > 0
    names = [n for n, hit in zip(dataset.categorical_names, on, strict=True) if hit]
    found = {n.split("=", 1)[1] for n in names if n.startswith("genres=")}
    return [g for g in GENRES if g in found]


def build_sample(
    dataset: Dataset,
    model_dir: Path,
    users: list[str],
    n_candidates: int | None = None,
    k: int = K,
) -> dict[str, Any]:
    """The demo document for ``users`` of ``dataset``, against the model in ``model_dir``."""
    manifest = read_manifest(model_dir)
    raw = json.loads((model_dir / "manifest.json").read_text())
    if n_candidates is None:
        n_candidates = int(raw.get("training", {}).get("n_candidates", 100))
    known = set(read_item_ids(model_dir))
    split = leave_last_out(dataset.sequences, dataset.times)
    knn = ItemKNN(split.train, dataset.n_items)
    row = {u: i for i, u in enumerate(dataset.users)}
    unknown = [u for u in users if u not in row]
    if unknown:
        raise ValueError(f"--users: {unknown} are not users of {dataset.name}")

    def ext(rows: np.ndarray) -> list[str]:
        return [dataset.item_ids[int(r) - 1] for r in rows]

    samples: list[dict[str, Any]] = []
    shown: set[str] = set()
    for user in users:
        u = row[user]
        full = split.test_history(u)
        cand, _ = knn.recall([full], n_candidates)  # (1, n) unseen items, best first
        history = ext(full[-manifest.history_len :])
        candidates = ext(cand[0])
        watched_next = ext(split.test[u : u + 1])[0]
        samples.append(
            {
                "user_id": user,
                "history": history,
                "candidates": candidates,
                "watched_next": watched_next,
                "history_total": len(full),
            }
        )
        shown.update(history, candidates, [watched_next])
    missing = sorted(shown - known)
    if missing:  # the vectors and the data must agree, else the page shows unscored films
        raise ValueError(f"{model_dir}: items {missing[:5]} of the sample have no vector")
    index = {item: i for i, item in enumerate(dataset.item_ids)}
    items = {
        item: {
            "title": title_of(dataset.texts[index[item]]),
            "genres": genres_of(dataset, index[item]),
        }
        for item in sorted(shown, key=lambda i: index[i])
    }
    return {
        "model_version": manifest.version,
        "dataset": dataset.name,
        "recall": {"method": knn.name, "n": n_candidates, "fit_on": "training split"},
        "history_len": manifest.history_len,
        "k": k,
        "users": samples,
        "items": items,
    }


def dumps(sample: dict[str, Any]) -> str:
    """One user or item a line: small to ship, and a change reads well in a diff."""
    head = {k: v for k, v in sample.items() if k not in ("users", "items")}
    lines = ["{"]
    lines += [f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    users = [json.dumps(u, ensure_ascii=False) for u in sample["users"]]
    lines.append('"users": [\n' + ",\n".join(users) + "\n],")
    items = [
        f"{json.dumps(i)}: {json.dumps(v, ensure_ascii=False)}" for i, v in sample["items"].items()
    ]
    lines.append('"items": {\n' + ",\n".join(items) + "\n}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_sample(sample: dict[str, Any], model_dir: Path) -> Path:
    path = model_dir / DEMO_FILE
    tmp = path.with_name(f".{DEMO_FILE}.tmp")
    tmp.write_text(dumps(sample))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the model folder, models/<version>")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument(
        "--users",
        default=None,
        help=f"comma-separated user ids (default: {FIRST_USER} and {N_USERS - 1} drawn)",
    )
    args = p.parse_args(argv)
    fetch_movielens(args.data_dir)
    dataset = load_movielens(args.data_dir)
    if args.users:
        users = [u.strip() for u in args.users.split(",") if u.strip()]
    else:
        users = pick_users(dataset, FIRST_USER, N_USERS, SEED)
    path = write_sample(build_sample(dataset, args.model, users), args.model)
    print(f"wrote {path} ({path.stat().st_size} bytes, users {', '.join(users)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
