"""The demo page's sample users: ``models/<version>/demo.json``, made on each machine.

    rerank demo-sample [--model models/<version>] [--interactions F --items F] [--users 196,186]
    make demo-sample                      # the default model, from MovieLens

For a few users it writes what the page at ``/demo`` needs to show a reranking without any
stored state: the user's history (the newest ``history_len`` items, oldest first), the
candidate list the project's own recall (item-kNN on the training split, as in
``training.pipeline.prepare``) made for that history, best first, and the item the user
chose next; and the title and genres of every item those lists name. The lists are the
offline test lists of the pipeline: history = training items + validation item, the held-out
next item is the test item.

The data is any ``Dataset`` whose item ids are the model's: MovieLens-100K by default
(fetched into ``data/`` on first use), the files a model was trained on, or a generated set
(``training.data.synthetic``, which the tests use). The file holds the data's titles and
histories, so it is git-ignored and never baked into an image: MovieLens may not be
redistributed. The output is deterministic (same data, same model folder, same users: same
bytes).

It needs numpy, pandas, pyarrow, scipy and threadpoolctl (the ``demo`` extra), never PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from contract import DEMO_FILE, Manifest, read_item_ids, read_manifest
from training.data import GENRES, Dataset
from training.recall import ItemKNN
from training.split import leave_last_out

# On MovieLens, user 196 is the README's example user; the others are drawn with a fixed seed.
FIRST_USER = "196"
N_USERS = 5
MIN_HISTORY = 20  # a user the page shows needs a history worth reading
SEED = 0
K = 10  # the page's top k


def title_of(text: str) -> str:
    """The title out of an item text: the text up to a ". Genres: " suffix, if it has one."""
    return text.rsplit(". Genres: ", 1)[0]


def _user_order(user: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others by name: a fixed order for the draw."""
    return (0, int(user), "") if user.isdigit() else (1, 0, user)


def pick_users(dataset: Dataset, first: str | None, n: int, seed: int) -> list[str]:
    """``first`` (if given), then others with at least MIN_HISTORY items drawn with ``seed``,
    ``n`` users in all."""
    if first is not None and first not in dataset.users:
        raise ValueError(f"--users: user {first!r} is not in {dataset.name}")
    eligible = sorted(
        (u for u, s in zip(dataset.users, dataset.sequences, strict=True) if len(s) >= MIN_HISTORY),
        key=_user_order,
    )
    head = [] if first is None else [first]
    others = [u for u in eligible if u != first]
    if not head and not others:
        raise ValueError(f"{dataset.name}: no user has {MIN_HISTORY} or more interactions")
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(others), size=min(n - len(head), len(others)), replace=False)
    return [*head, *(others[i] for i in drawn)]


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
        "new_items": new_item_form(manifest),
        "dataset": dataset.name,
        "recall": {"method": knn.name, "n": n_candidates, "fit_on": "training split"},
        "history_len": manifest.history_len,
        "k": k,
        "users": samples,
        "items": items,
    }


def new_item_form(manifest: Manifest) -> dict[str, Any] | None:
    """What the page's new-item form asks for: the item tower's attributes, categorical ones
    with the values it has columns for, numeric ones with the training median as the
    placeholder; None when the model has no item tower (new items wait for a retrain)."""
    tower = manifest.tower
    if tower is None:
        return None
    return {
        "categorical": [{"name": c.name, "values": list(c.values)} for c in tower.categorical],
        "numeric": [{"name": n.name, "median": n.median} for n in tower.numeric],
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
    """``model_dir/demo.json``, replaced whole: a reader never sees half a file."""
    path = model_dir / DEMO_FILE
    tmp = path.with_name(f".{DEMO_FILE}.tmp")
    tmp.write_text(dumps(sample))
    tmp.replace(path)
    return path


def make_sample(
    dataset: Dataset,
    model_dir: Path,
    users: list[str] | None = None,
    first: str | None = None,
) -> Path:
    """Build the sample of ``dataset`` for the model in ``model_dir`` and write it there.

    ``users`` names the users; without it, ``first`` (if given) and others drawn with a
    fixed seed, N_USERS in all.
    """
    if not users:
        users = pick_users(dataset, first, N_USERS, SEED)
    return write_sample(build_sample(dataset, model_dir, users), model_dir)


if __name__ == "__main__":
    # One parser for both doors: training/cli.py's `rerank demo-sample`.
    import sys

    from training.cli import main

    sys.exit(main(["demo-sample", *sys.argv[1:]]))
