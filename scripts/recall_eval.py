"""Recall channels and their fusion on MovieLens-100K, leave-last-out, all users.

For each channel and for reciprocal-rank fusion: Recall@N of the top-N list, and NDCG@10,
HR@10 and MRR of the list's own order (a test item the list missed counts 0), with the
minutes each fit takes. Hyperparameters (EASE lambda and decay, Markov window and query
weights, RRF weights and k) are chosen on the validation split; the test split is read once
per chosen setting. With ``--training-lists``, also the leak-free training lists of
``training.fusion.time_cut``: channels refitted on the training split minus each user's
last ``HOLDOUT`` items, answering for those positions.

    python -m scripts.recall_eval [--data data] [--out docs/results/recall-DATE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.channels import EASE, Channel, Markov
from training.data import fetch_movielens, load_movielens
from training.fusion import (
    FUSED_CHANNELS,
    ChannelParams,
    fit_channels,
    list_metrics,
    run_channels,
    time_cut,
    tune_rrf,
)
from training.recall import ALSRecall, ItemKNN
from training.sasrec import SASRecConfig, SASRecRecall
from training.split import leave_last_out

N = 100  # the list length scored, Recall@N
DEPTH = 200  # each channel's list length fed to fusion
HOLDOUT = 10  # training positions per user in the leak-free training lists
EASE_GRID: dict[str, list[Any]] = {
    "lam": [10.0, 30.0, 50.0, 100.0, 200.0],
    "decay": [1.0, 0.97, 0.95, 0.9],
}
MARKOV_GRID: dict[str, list[Any]] = {
    "window": [3, 5, 10],
    "last": [5, 10, 20],
    "query_decay": [0.8, 0.9],
    "alpha": [0.5, 1.0],
}
SASREC = SASRecConfig(max_minutes=10.0)


def _timed(make: Callable[[], Channel]) -> tuple[Channel, float]:
    started = time.monotonic()
    channel = make()
    return channel, (time.monotonic() - started) / 60


def _rounded(m: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in m.items()}


def _grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    parser.add_argument("--out", type=Path, default=Path(f"docs/results/recall-{stamp}.json"))
    parser.add_argument("--training-lists", action="store_true")
    args = parser.parse_args()

    fetch_movielens(args.data)
    ds = load_movielens(args.data)
    split = leave_last_out(ds.sequences, ds.times)
    users = range(len(ds.users))
    val_hist = [split.val_history(u) for u in users]
    test_hist = [split.test_history(u) for u in users]
    n_items = ds.n_items
    result: dict[str, Any] = {
        "dataset": ds.name,
        "users": len(ds.users),
        "n": N,
        "depth": DEPTH,
        "protocol": "leave-last-out; val = second to last, test = last; all users; "
        "a test item the list missed counts 0",
        "channels": {},
    }

    def score(channel: Channel, minutes: float, chosen: dict[str, Any]) -> None:
        val_m = list_metrics(channel.recall(val_hist, N)[0], split.val)
        test_m = list_metrics(channel.recall(test_hist, N)[0], split.test)
        result["channels"][channel.name] = {
            "params": chosen, "fit_minutes": round(minutes, 2),
            "val": _rounded(val_m), "test": _rounded(test_m),
        }  # fmt: skip
        print(
            f"{channel.name:9s} {minutes:5.2f} min  val {_rounded(val_m)}  test {_rounded(test_m)}"
        )

    def choose(make: Callable[[dict[str, Any]], Channel], grid: dict[str, list[Any]]) -> Any:
        best, best_p = -1.0, {}
        for p in _grid(grid):
            ndcg = list_metrics(make(p).recall(val_hist, N)[0], split.val)["ndcg@10"]
            if ndcg > best:
                best, best_p = ndcg, p
        return best_p

    # Fixed channels.
    knn, minutes = _timed(lambda: ItemKNN(split.train, n_items))
    score(knn, minutes, {})
    als, minutes = _timed(lambda: ALSRecall(split.train, n_items))
    score(als, minutes, {"factors": 64})

    # EASE and Markov: a grid on validation, then one fit with the chosen setting.
    started = time.monotonic()
    ease_p = choose(lambda p: EASE(split.train, n_items, p["lam"], p["decay"]), EASE_GRID)
    result["ease_grid_minutes"] = round((time.monotonic() - started) / 60, 2)
    ease, minutes = _timed(lambda: EASE(split.train, n_items, ease_p["lam"], ease_p["decay"]))
    score(ease, minutes, ease_p)
    started = time.monotonic()
    markov_p = choose(lambda p: Markov(split.train, n_items, **p), MARKOV_GRID)
    result["markov_grid_minutes"] = round((time.monotonic() - started) / 60, 2)
    markov, minutes = _timed(lambda: Markov(split.train, n_items, **markov_p))
    score(markov, minutes, markov_p)

    # SASRec: early-stopped on the validation item.
    sasrec = SASRecRecall(split.train, n_items, split.val, SASREC)
    score(sasrec, sasrec.minutes, SASREC.to_dict())
    result["channels"]["sasrec"]["epochs"] = len(sasrec.log)
    result["channels"]["sasrec"]["log"] = sasrec.log

    # Fusion: RRF weights and k on validation, for the three new channels and for all five.
    channels: list[Channel] = [ease, markov, sasrec, knn, als]
    val_lists = run_channels(channels, val_hist, DEPTH)
    test_lists = run_channels(channels, test_hist, DEPTH)
    result["fusion"] = {}
    for label, names in [("rrf-3", list(FUSED_CHANNELS)), ("rrf-5", [c.name for c in channels])]:
        started = time.monotonic()
        tuned = tune_rrf({c: val_lists[c] for c in names}, split.val, N, n_items)
        fused = tuned.fusion.fuse(test_lists, N, n_items)
        test_m = list_metrics(fused.items, split.test)
        val_m = list_metrics(tuned.fusion.order(val_lists, N, n_items), split.val)
        result["fusion"][label] = {
            "weights": tuned.fusion.weights, "k": tuned.fusion.k,
            "tune_minutes": round((time.monotonic() - started) / 60, 2),
            "val": _rounded(val_m), "test": _rounded(test_m), "features": fused.names,
        }  # fmt: skip
        print(f"{label}  {tuned.fusion}  val {_rounded(val_m)}  test {_rounded(test_m)}")

    params = ChannelParams(
        ease_lambda=ease_p["lam"], ease_decay=ease_p["decay"],
        markov_window=markov_p["window"], markov_alpha=markov_p["alpha"],
        markov_last=markov_p["last"], markov_query_decay=markov_p["query_decay"],
        sasrec=SASREC, rrf_weights=result["fusion"]["rrf-3"]["weights"],
        rrf_k=result["fusion"]["rrf-3"]["k"],
    )  # fmt: skip
    result["chosen_params"] = asdict(params)

    if args.training_lists:
        # Leak-free training lists: channels fitted on the train split less each user's
        # last HOLDOUT items answer for those positions.
        started = time.monotonic()
        fit_train, queries = time_cut(split.train, HOLDOUT)
        first = queries.first_held_out(len(ds.users))  # early-stops SASRec
        cut_params = replace(params, sasrec=replace(SASREC))
        cut_channels = fit_channels(fit_train, n_items, first, cut_params)
        fit_minutes = (time.monotonic() - started) / 60
        fused = cut_params.fusion().fuse(
            run_channels(cut_channels, queries.history, DEPTH), N, n_items
        )
        result["training_lists"] = {
            "holdout": HOLDOUT, "queries": len(queries.target),
            "fit_minutes": round(fit_minutes, 2),
            "total_minutes": round((time.monotonic() - started) / 60, 2),
            "metrics": _rounded(list_metrics(fused.items, queries.target)),
        }  # fmt: skip
        print(f"training lists {result['training_lists']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
