"""Tune the deep reranker on the VALIDATION split only; the test split is never scored here.

Prepares MovieLens once, trains each named variant, and appends one JSON line per variant to
``--out`` with its per-epoch validation NDCG@10. Seed ensembles are scored by averaging the
members' validation scores, pairwise.
Run: ``.venv/bin/python scripts/tune.py --variants base seed1 e8avg3``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np

from training.data import fetch_movielens, load_movielens
from training.metrics import ndcg_at, ranked_positions
from training.pipeline import PipelineConfig, Prepared, fit, prepare
from training.train import predict

# Each variant is a change to the defaults (BASE). docs/model.md has the validation scores of
# these and of the variants whose code was taken out, and what came of each.
BASE = PipelineConfig()
VARIANTS: dict[str, PipelineConfig] = {
    "base": BASE,
    "e8": replace(BASE, train=replace(BASE.train, epochs=8)),
    "seed1": replace(BASE, seed=1, train=replace(BASE.train, seed=1)),
    "e8seed1": replace(BASE, seed=1, train=replace(BASE.train, seed=1, epochs=8)),
    "lists200": replace(BASE, lists_per_user=200),
    "e8avg3": replace(BASE, train=replace(BASE.train, epochs=8, average_last=3)),
    "avg3": replace(BASE, train=replace(BASE.train, average_last=3)),
    "drop3": replace(BASE, dropout=0.3),
    "e10": replace(BASE, train=replace(BASE.train, epochs=10, max_minutes=15.0)),
    "drop1": replace(BASE, dropout=0.1),
    "lists60": replace(BASE, lists_per_user=60),
    "lists90": replace(BASE, lists_per_user=90),
    "ctx8": replace(BASE, train=replace(BASE.train, epochs=8, max_minutes=12.0)),
    "noctx": replace(BASE, list_context=False, train=replace(BASE.train, epochs=8)),
    "hist100": replace(BASE, history_len=100, train=replace(BASE.train, max_minutes=20.0)),
    "wd01": replace(BASE, train=replace(BASE.train, weight_decay=0.01)),
    "h128": replace(BASE, hidden=128),
    "d96l90": replace(BASE, dim=96, lists_per_user=90),
    "lr3": replace(BASE, train=replace(BASE.train, lr=3e-3)),
    "b128": replace(BASE, train=replace(BASE.train, batch_size=128)),
    "lr3wd01": replace(BASE, train=replace(BASE.train, lr=3e-3, weight_decay=0.01)),
    "minh18": replace(BASE, min_history=18),
    "minh10": replace(BASE, min_history=10),
    "heads4": replace(BASE, n_heads=4),
    # Id dropout (BASE: 0.1): what the warm lists lose for the cold path's sake.
    "iddrop0": replace(BASE, id_dropout=0.0),
    "iddrop2": replace(BASE, id_dropout=0.2),
    # The fused pipeline: item-kNN and ALS as features or not, how many lists of each kind,
    # and how often a fused list trains without its features.
    "nofeatch": replace(BASE, feature_channels=()),
    "knn60": replace(BASE, lists_per_user=60),
    "knn0": replace(BASE, lists_per_user=0),
    "holdout30": replace(BASE, fused_holdout=30),
    "fdrop15": replace(BASE, feat_dropout=0.15),
    "fdrop5": replace(BASE, feat_dropout=0.5),
}


def _val_ndcg(prep: Prepared, scores: np.ndarray) -> float:
    return float(ndcg_at(ranked_positions(scores, prep.val_lists.target)).mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("data/tune.jsonl"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--with-saved", nargs="*", default=[], help="earlier variants' saved scores")
    args = p.parse_args()
    fetch_movielens(args.data_dir)
    dataset = load_movielens(args.data_dir)
    scores: dict[str, np.ndarray] = {}
    preps: dict[tuple[object, ...], Prepared] = {}
    for name in args.variants:
        cfg = VARIANTS[name]
        key = (cfg.lists_per_user, cfg.history_len, cfg.min_history, cfg.feature_channels,
               cfg.fused_holdout)  # fmt: skip
        if key not in preps:
            preps[key] = prepare(dataset, cfg, args.data_dir / "cache")
        prep = preps[key]
        started = time.monotonic()
        model, log = fit(prep, cfg)
        scores[name] = predict(model, prep.val_lists)
        row = {
            "variant": name,
            "val_ndcg@10": _val_ndcg(prep, scores[name]),
            "minutes": (time.monotonic() - started) / 60,
            "log": log,
        }
        print(json.dumps(row))
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        np.save(args.out.with_name(f"tune-{name}.npy"), scores[name])
    for name in args.with_saved:
        scores[name] = np.load(args.out.with_name(f"tune-{name}.npy"))
    if len(scores) > 1 and len(preps) == 1:
        prep = next(iter(preps.values()))
        for a, b in combinations(scores, 2):
            row = {"variant": f"{a}+{b}", "val_ndcg@10": _val_ndcg(prep, scores[a] + scores[b])}
            print(json.dumps(row))
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
