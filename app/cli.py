"""The ``rerank`` command: ``serve``, ``load`` and the version verbs here (``versions``,
``activate``, ``drop``, ``split``), the offline verbs from ``training``.

Exit status: 0 done; 1 Redis or the model folder failed; 2 refused input (an unknown or
unloaded version, shares that do not sum to 100, a fourth live version, a live version
dropped), with one line naming it and nothing changed in Redis.

The offline verbs import ``training.cli`` only when called, so the service never imports
PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from app.config import Settings
from app.logs import configure_logging

log = logging.getLogger("rerank")

OFFLINE_VERBS = {
    "data": "fetch and prepare MovieLens-100K",
    "train": "train the reranker and export a model version",
    "eval": "evaluate a model version against the baselines",
    "recall": "fused candidate lists per user, written as /rerank bodies (JSON lines)",
    "encoder": "make (build) or export the text encoder of new items in models/encoder/",
    "demo-sample": "write the demo page's sample users into a model folder (no PyTorch)",
    "items": "add items after training: `rerank items add FILE` writes their vectors to Redis",
}
# What an offline verb needs when it needs less than the training extra.
EXTRAS = {"demo-sample": "the demo extra (make demo-sample)"}


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from app.factory import start_embedded

    server = None
    if settings.redis_url is None:
        # Started here rather than in each worker, so all workers share one Redis; they find
        # it through the environment, like a configured one.
        server = start_embedded(settings)
        os.environ["RERANK_REDIS_URL"] = server.url
        log.info(
            "RERANK_REDIS_URL unset: embedded Redis at %s; load a model into it with "
            "`RERANK_REDIS_URL=%s rerank load models/<version>` (RERANK_EMBEDDED_REDIS_PORT "
            "fixes its port)",
            server.url,
            server.url,
        )
        # uvicorn re-raises the signal that stopped it once it has shut down; under the
        # default SIGTERM action that would end the process before `finally` stops Redis.
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(
            "app.main:app",
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=args.workers,
            loop="uvloop",
            # By import path: with workers, uvicorn hands its config to spawned processes.
            http="app.protocol:BoundedHttpTools",
            log_level=settings.log_level.lower(),
            access_log=False,  # app.access logs each request with its X-Request-ID
            # Nothing reads the client's address, so no layer per request rewrites it from
            # X-Forwarded-For.
            proxy_headers=False,
            # uvicorn's own loggers go to the root handler (app/logs.py): one format, escaped.
            log_config=None,
            # After the shutdown delay (app/drain.py), the longest wait for in-flight requests.
            timeout_graceful_shutdown=max(1, round(settings.drain_s)),
        )
    finally:
        if server is not None:
            server.close()
            signal.signal(signal.SIGTERM, previous)
    return 0


def load(args: argparse.Namespace, settings: Settings) -> int:
    from app.errors import RerankError, VersionRefused
    from app.loader import load_into_redis
    from contract import ManifestError

    if settings.redis_url is None:
        log.error("set RERANK_REDIS_URL to the Redis to load into")
        return 2
    try:
        manifest = load_into_redis(
            settings.redis_url,
            Path(args.model_dir),
            settings.key_prefix,
            activate=not args.no_activate,
            cluster=settings.redis_cluster,
            name=args.name,
        )
    except VersionRefused as exc:
        log.error("%s", exc)
        return 2
    except (RerankError, ManifestError) as exc:
        log.error("%s", exc)
        return 1
    log.info("version %s loaded%s", manifest.version, "" if args.no_activate else " and active")
    return 0


def version_verb(args: argparse.Namespace, settings: Settings) -> int:
    """``versions``, ``activate``, ``drop`` and ``split`` against RERANK_REDIS_URL."""
    import redis

    from app.errors import VersionRefused
    from app.loader import connect
    from app.store import Keys

    if settings.redis_url is None:
        log.error("set RERANK_REDIS_URL to the Redis that holds the versions")
        return 2
    client = connect(settings.redis_url, settings.redis_cluster)
    try:
        return VERSION_VERBS[args.verb](args, settings, client, Keys(settings.key_prefix))
    except VersionRefused as exc:
        log.error("%s", exc)
        return 2
    except redis.RedisError as exc:
        log.error("Redis: %s", exc)
        return 1
    finally:
        client.close()


def versions(args: argparse.Namespace, settings: Settings, client: Any, keys: Any) -> int:
    import json

    from app.versions import list_versions

    found = list_versions(client, keys)
    if args.json:
        print(json.dumps([v.to_dict() for v in found], indent=2))  # noqa: T201  # the output
        return 0
    print(f"{'version':<32} {'live':<10} {'loaded at':<26} offline (ndcg@10 by recall)")  # noqa: T201
    for v in found:
        live = "active" if v.active else ""
        if v.share:
            live = f"{live}{' ' if live else ''}{v.share}%"
        name = v.version if v.artifact is None else f"{v.version} (= {v.artifact})"
        loaded = (v.loaded_at or "?") if v.loaded else "NOT LOADED"
        print(f"{name:<32} {live or '-':<10} {loaded:<26} {offline_summary(v.manifest)}")  # noqa: T201
    return 0


def offline_summary(manifest: dict[str, Any]) -> str:
    """The model's own row of the offline evaluation, per recall source: ``als 0.120``."""
    metrics = manifest.get("offline_metrics")
    if not isinstance(metrics, dict):
        return "-"
    parts = []
    for source, methods in metrics.items():
        if not isinstance(methods, dict) or not methods:
            continue
        # The evaluation lists the baselines first and the model last.
        row = methods.get("deep reranker", list(methods.values())[-1])
        if isinstance(row, dict) and isinstance(row.get("ndcg@10"), int | float):
            parts.append(f"{source} {row['ndcg@10']:.3f}")
    return " ".join(parts) or "-"


def activate(args: argparse.Namespace, settings: Settings, client: Any, keys: Any) -> int:
    from app.versions import activate as activate_version

    activate_version(client, keys, args.version)
    log.info(
        "version %s active; services follow within RERANK_VERSION_POLL_S once it is loaded",
        args.version,
    )
    return 0


def drop(args: argparse.Namespace, settings: Settings, client: Any, keys: Any) -> int:
    from app.versions import drop as drop_version

    grace = args.grace_s if args.grace_s is not None else 2 * settings.version_poll_s
    deleted = drop_version(client, keys, args.version, grace_s=grace)
    log.info("version %s dropped: manifest and %d vectors deleted", args.version, deleted)
    return 0


def split(args: argparse.Namespace, settings: Settings, client: Any, keys: Any) -> int:
    from app.errors import VersionRefused
    from app.feedback import report
    from app.split import Split
    from app.versions import arm_stats, clear_split, read_split, set_split

    if args.clear and (args.report or args.shares):
        raise VersionRefused("split: --clear takes no shares and no --report")
    if args.report:
        print(report(arm_stats(client, keys, args.shares), settings.feedback_top_k))  # noqa: T201
        return 0
    if args.clear:
        cleared = clear_split(client, keys)
        log.info("split %s; every user is served rr:active", "cleared" if cleared else "not set")
        return 0
    if not args.shares:
        current = read_split(client, keys)
        shown = " ".join(f"{v}={p}" for v, p in current.shares) if current else "none"
        print(f"split: {shown}")  # noqa: T201
        return 0
    wanted = Split.from_args(args.shares)
    set_split(client, keys, wanted)
    log.info(
        "split %s set; services follow within RERANK_VERSION_POLL_S once every version is loaded",
        " ".join(f"{v}={p}" for v, p in wanted.shares),
    )
    return 0


VERSION_VERBS = {"versions": versions, "activate": activate, "drop": drop, "split": split}


def offline(verb: str, rest: Sequence[str]) -> int:
    # training.cli imports PyTorch only once a verb runs, so `--help` works without it.
    try:
        training_cli = importlib.import_module("training.cli")
        result = training_cli.main([verb, *rest])
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(verb, "the training extra (make install-train)")
        log.error("`rerank %s` needs %s: %s", verb, extra, exc)
        return 2
    return int(result or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rerank", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("serve", help="run the HTTP service (embedded Redis if none is set)")
    s.add_argument("--host", default=None, help="bind address (default RERANK_HOST)")
    s.add_argument("--port", type=int, default=None, help="port (default RERANK_PORT)")
    s.add_argument("--workers", type=int, default=1, help="worker processes")
    ld = sub.add_parser("load", help="load models/<version> into Redis and activate it")
    ld.add_argument("model_dir", help="the model folder, e.g. models/<version>")
    ld.add_argument("--no-activate", action="store_true", help="load without activating")
    ld.add_argument(
        "--as",
        dest="name",
        metavar="NAME",
        default=None,
        help="load the folder under another version name (A/A tests, staged copies)",
    )
    vs = sub.add_parser("versions", help="every version in Redis: live, share, loaded at")
    vs.add_argument("--json", action="store_true", help="as JSON, with the offline metrics")
    ac = sub.add_parser("activate", help="make a loaded version active (rollback: the old one)")
    ac.add_argument("version")
    dr = sub.add_parser("drop", help="delete a version that is not live from Redis")
    dr.add_argument("version")
    dr.add_argument(
        "--grace-s",
        type=float,
        default=None,
        help="wait between removing the manifest and the vectors (default 2 x "
        "RERANK_VERSION_POLL_S)",
    )
    sp = sub.add_parser("split", help="share users between live versions; --clear; --report")
    sp.add_argument("shares", nargs="*", metavar="VERSION=PCT", help="whole percents, sum 100")
    sp.add_argument("--clear", action="store_true", help="remove the split: rr:active only")
    sp.add_argument(
        "--report",
        action="store_true",
        help="online hit rate and MRR per version with 95%% intervals (of the split's "
        "versions, or of the versions named)",
    )
    for verb, text in OFFLINE_VERBS.items():
        sub.add_parser(verb, help=text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Offline verbs pass their arguments through untouched to training.cli.
    if argv and argv[0] in OFFLINE_VERBS:
        configure_logging("INFO")
        return offline(argv[0], argv[1:])
    args = parser().parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.verb == "serve":
        if args.workers < 1:
            log.error("--workers=%d must be at least 1", args.workers)
            return 2
        from app.metrics import multiprocess_dir

        # Workers share their metrics through a folder, so that any scrape reads them all.
        with multiprocess_dir(args.workers):
            return serve(args, settings)
    if args.verb in VERSION_VERBS:
        return version_verb(args, settings)
    return load(args, settings)


if __name__ == "__main__":
    sys.exit(main())
