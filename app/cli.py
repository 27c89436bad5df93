"""The ``rerank`` command: ``serve`` and ``load`` here, the offline verbs from ``training``.

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

from app.config import Settings
from app.logs import configure_logging

log = logging.getLogger("rerank")

OFFLINE_VERBS = {
    "data": "fetch and prepare MovieLens-100K",
    "train": "train the reranker and export a model version",
    "eval": "evaluate a model version against the baselines",
    "recall": "fused candidate lists per user, written as /rerank bodies (JSON lines)",
    "encoder": "export the text encoder of new items to models/encoder/",
}


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
    from app.errors import RerankError
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
        )
    except (RerankError, ManifestError) as exc:
        log.error("%s", exc)
        return 1
    log.info("version %s loaded%s", manifest.version, "" if args.no_activate else " and active")
    return 0


def offline(verb: str, rest: Sequence[str]) -> int:
    # training.cli imports PyTorch only once a verb runs, so `--help` works without it.
    try:
        training_cli = importlib.import_module("training.cli")
        result = training_cli.main([verb, *rest])
    except ModuleNotFoundError as exc:
        log.error("`rerank %s` needs the training extra (make install-train): %s", verb, exc)
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
    return load(args, settings)


if __name__ == "__main__":
    sys.exit(main())
