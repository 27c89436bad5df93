"""Items that arrive after training, on MovieLens-100K: the held-out measurement.

10% of the items are held out of training entirely; a model is trained on the rest with the
settings of ``make train`` (id dropout and the fused recall lists included); on the test
lists whose target is a held-out item (placed at a random position of the fused lists, the
new item without recall features, and of the item-kNN lists of plain ids), NDCG@10 of the
model with the items' cold vectors against the caller's order and against the service without
their vectors (training/cold.py, docs/model.md). Writes the report as JSON and prints its
table.

    python -m scripts.cold_eval [--data data] [--fraction 0.1] [--seed 0]
                                [--out docs/results/cold-DATE.json]
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from training.cold import held_out, markdown
from training.data import fetch_movielens, load_movielens
from training.pipeline import PipelineConfig
from training.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data"), help="where MovieLens is kept")
    p.add_argument("--fraction", type=float, default=0.1, help="share of items held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes,
                   help="the reranker's training time cap")  # fmt: skip
    p.add_argument("--out", type=Path, help="default: docs/results/cold-<date>.json")
    args = p.parse_args(argv)
    fetch_movielens(args.data)
    dataset = load_movielens(args.data)
    cfg = PipelineConfig(
        seed=args.seed, train=TrainConfig(seed=args.seed, max_minutes=args.max_minutes)
    )
    report = held_out(dataset, cfg, args.fraction, args.seed, args.data / "cache")
    report["training"] = cfg.to_dict()
    out = args.out or Path("docs/results") / f"cold-{datetime.now(UTC):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
