"""What a /rerank body costs in process before it reaches Redis: plain ids against recall features.

    python -m loadtest.request_cost          # loadtest/results/request-cost-<date>.json

On bench's model and traffic (``loadtest.bench``; its traffic and model flags pass through),
the same requests as plain ids and as ``{"id", "features"}`` objects with the recall features
bench sends: microseconds per request to parse the body (``app.body.parse_json``), to parse
and validate it (``RerankRequest``), and to turn the features into the model's rows
(``LoadedModel.features``). Each figure is the best of ``--repeat`` passes over the requests,
in one process: the part of ``make bench``'s features / plain ratio that is the service's
own Python, without the noise of a server under load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.body import parse_json
from app.model import open_model
from app.schemas import Candidates, RerankRequest
from loadtest import bench
from loadtest import traffic as tf
from loadtest.harness import ROOT, relative

REQUESTS = 300
REPEAT = 5
RESULTS = ROOT / "loadtest" / "results"


def best_us(fn: Callable[[Any], Any], inputs: list[Any], repeat: int) -> float:
    """Microseconds per input of the fastest of ``repeat`` passes."""
    timer = timeit.Timer(lambda: deque(map(fn, inputs), maxlen=0))
    return min(timer.repeat(repeat, number=1)) / len(inputs) * 1e6


def run(args: argparse.Namespace) -> dict[str, Any]:
    bargs = bench.parse(args.bench_args)
    folder, manifest, traffic = bench.model_and_traffic(bargs)
    names = manifest.feature_names or bench.FEATURE_NAMES
    n = bargs.candidates

    def bodies(features: list[str] | None) -> list[bytes]:
        made = tf.bodies(traffic, n, bargs.k, args.requests, features)
        return [body for path, body in made if path == "/rerank"]

    plain, featured = bodies(None), bodies(names)
    model = open_model(folder, manifest, ["CPUExecutionProvider"], 1, max(n, 100), 1)
    requests = [RerankRequest.model_validate(parse_json(b)) for b in featured]
    every = np.arange(n)

    def rows(req: RerankRequest) -> Any:
        candidates = req.candidates
        assert isinstance(candidates, Candidates)  # the bodies carry features
        return model.features(candidates.features, every[: len(candidates)])

    def validate(body: bytes) -> RerankRequest:
        return RerankRequest.model_validate(parse_json(body))

    figures = {
        "body_bytes": {"plain": float(np.mean(list(map(len, plain)))),
                       "features": float(np.mean(list(map(len, featured))))},
        "parse_us": {"plain": best_us(parse_json, plain, args.repeat),
                     "features": best_us(parse_json, featured, args.repeat)},
        "parse_and_validate_us": {"plain": best_us(validate, plain, args.repeat),
                                  "features": best_us(validate, featured, args.repeat)},
        "feature_rows_us": {"plain": 0.0, "features": best_us(rows, requests, args.repeat)},
    }  # fmt: skip
    return {
        "command": " ".join(["python -m loadtest.request_cost", *args.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "model": folder.name,
        "candidates": n,
        "feature_names": names,
        "requests": len(plain),
        "figures": figures,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=REQUESTS)
    p.add_argument("--repeat", type=int, default=REPEAT)
    p.add_argument("--out", type=Path, default=None,
                   help="default loadtest/results/request-cost-<date>.json")  # fmt: skip
    return bench.parse_with_bench_flags(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    result = run(args)
    out = args.out or RESULTS / f"request-cost-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| per /rerank body, {result['candidates']} candidates | plain ids | "
          f"{len(result['feature_names'])} recall features |")  # fmt: skip
    print("|---|---|---|")
    for name, pair in result["figures"].items():
        print(f"| {name} | {pair['plain']:.1f} | {pair['features']:.1f} |")
    bench.log(f"wrote {relative(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
