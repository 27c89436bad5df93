"""Offline verbs of the ``rerank`` command: data, train, eval, encoder.

``app.cli`` hands these verbs here, importing this module only when one of them is asked
for, so that the service never imports PyTorch. This module imports the training code (and
PyTorch with it) only once a verb runs: ``--help`` works on a machine without PyTorch, and
``rerank data`` needs only numpy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rerank", description="offline pipeline")
    sub = p.add_subparsers(dest="verb", required=True)
    data = sub.add_parser("data", help="fetch MovieLens-100K into --data-dir")
    data.add_argument("--data-dir", type=Path, default=Path("data"))
    train = sub.add_parser("train", help="data, recall, train, evaluate, export")
    train.add_argument("--data-dir", type=Path, default=Path("data"))
    train.add_argument("--models-dir", type=Path, default=Path("models"))
    train.add_argument("--version", help="folder name under --models-dir (default: dated)")
    train.add_argument("--default", action="store_true", help="write models/DEFAULT")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="training time budget in minutes (default: TrainConfig's)",
    )
    ev = sub.add_parser("eval", help="evaluate an exported model (its ONNX file) again")
    ev.add_argument("model_dir", type=Path)
    ev.add_argument("--data-dir", type=Path, default=Path("data"))
    enc = sub.add_parser("encoder", help="the text encoder of new items (models/encoder/)")
    enc_sub = enc.add_subparsers(dest="action", required=True)
    enc_export = enc_sub.add_parser(
        "export", help="all-MiniLM-L6-v2 to int8 ONNX, checked on the catalogue's texts"
    )
    enc_export.add_argument("--out", type=Path, default=Path("models/encoder"))
    enc_export.add_argument("--data-dir", type=Path, default=Path("data"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from training.data import fetch_movielens, load_movielens

    if args.verb == "data":
        print(f"MovieLens-100K in {fetch_movielens(args.data_dir)}")
        return 0
    from training.pipeline import PipelineConfig, prepare, run
    from training.train import TrainConfig

    fetch_movielens(args.data_dir)
    dataset = load_movielens(args.data_dir)
    if args.verb == "encoder":
        from training.text_onnx import export_encoder

        parity = export_encoder(args.out, dataset.texts)
        print(f"exported {args.out}: {json.dumps(parity, indent=2)}")
        return 0
    cache = args.data_dir / "cache"
    if args.verb == "train":
        budget = {} if args.max_minutes is None else {"max_minutes": args.max_minutes}
        cfg = PipelineConfig(seed=args.seed, train=TrainConfig(seed=args.seed, **budget))
        folder = run(dataset, args.models_dir, cfg, cache, args.version)
        if args.default:
            (args.models_dir / "DEFAULT").write_text(folder.name + "\n")
        print(f"exported {folder}")
        print((folder / "report.md").read_text())
        return 0
    # eval: the exported artifact itself (ONNX Runtime on the float16 vectors), as served
    from training.evaluate import evaluate, markdown, write_report
    from training.onnx_scorer import OnnxScorer

    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    cfg = PipelineConfig(**{k: v for k, v in manifest["training"].items() if k != "train"})
    prep = prepare(dataset, cfg, cache)
    report = evaluate(prep, OnnxScorer(args.model_dir, dataset.item_ids), cfg)
    report["recall"] = prep.recall
    report["scored_by"] = "onnxruntime on the exported float16 vectors"
    # What only the training run knew (its per-epoch log, the pipeline's minutes) stays.
    old = args.model_dir / "report.json"
    if old.exists():
        trained = json.loads(old.read_text())
        if "train_log" in trained:
            report["train_log"] = trained["train_log"]
        if "minutes" in trained:
            report["minutes"] = trained["minutes"]
    write_report(report, args.model_dir)
    print(markdown(report))
    return 0
