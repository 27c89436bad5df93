"""The scale run (docs/data.md): `rerank train` on a generated set of the given size, measured.

    python -m scripts.scale_run                      # 1,000,000 interactions: 100,000 users
                                                     # x 10 steps, 50,000 items, --max-minutes 30
    python -m scripts.scale_run --users 2000 --items 1000 --max-minutes 1   # a quick try

Steps, each as a child process of its own:

1. ``rerank data synthetic --users --items --length --out`` writes the two files;
2. ``rerank train --interactions --items --max-minutes --models-dir <work>`` trains; the
   script measures its wall time, the peak RSS of the largest process of its tree
   (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and the peak of the whole tree's summed RSS
   (sampled from /proc every half second), and reads each step's wall time from the
   ``step NAME: S s`` lines it prints (``training/progress.py``) and from its report;
3. the service on that model (``loadtest/harness.py``: its own Redis, ``rerank serve``),
   ``--requests`` POST /rerank of random histories and candidates, then its RSS.

Writes ``docs/results/scale-<date>.json`` (``--out``) with the command, the sizes, the
measurements and the checks against the standards: training within 45 minutes and 8 GB,
the service within the bench's 400 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (?P<name>.+): (?P<s>[0-9.]+) s$")
WALL_MAX_MIN, RSS_MAX_GB, SERVICE_RSS_MAX_MB = 45.0, 8.0, 400.0


def rerank(*args: str) -> list[str]:
    """The `rerank` verb as a child command line, from this checkout."""
    return [sys.executable, "-m", "app.cli", *args]


class TreeRss:
    """The peak of the summed RSS of a process and all its descendants, sampled."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid, self.interval_s, self.peak_mb = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 1e6)
            self._stop.wait(self.interval_s)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_measured(cmd: list[str], log: Path, work: Path) -> dict[str, Any]:
    """Run ``cmd`` with its output to ``log``: exit status, wall seconds, peak RSS. The
    command is recorded with ``work`` written as ``<work>``: no machine's path in results."""
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeRss(proc.pid)
        rc = proc.wait()
    tree_peak = sampler.stop()
    # ru_maxrss: kilobytes on Linux, the largest of the children waited for so far.
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3
    return {
        "cmd": shlex.join(["rerank", *cmd[3:]]).replace(str(work), "<work>"),
        "rc": rc,
        "wall_s": round(time.monotonic() - started, 1),
        "peak_rss_mb_largest_process": round(largest, 1),
        "peak_rss_mb_tree_sampled": round(tree_peak, 1),
    }


def step_seconds(log: Path) -> dict[str, float]:
    """The ``step NAME: S s`` lines of a training log, in order (a repeated name sums)."""
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if m := STEP_LINE.match(line.strip()):
            out[m["name"]] = round(out.get(m["name"], 0.0) + float(m["s"]), 1)
    return out


def service_rss(folder: Path, n_requests: int, seed: int) -> dict[str, Any]:
    """The service on ``folder``'s model: its RSS after loading and after the requests."""
    import numpy as np
    import orjson

    from loadtest import load
    from loadtest.harness import harness

    item_ids = (folder / "item_ids.txt").read_text().splitlines()
    rng = np.random.default_rng(seed)

    def body(i: int) -> bytes:
        picks = rng.choice(len(item_ids), 120, replace=False)
        return orjson.dumps({
            "user_id": f"scale-{i % 50}",
            "history": [item_ids[j] for j in picks[:20]],
            "candidates": [item_ids[j] for j in picks[20:]],
            "k": 10,
        })  # fmt: skip

    bodies = [body(i) for i in range(n_requests)]
    with harness("rr", name="rerank-scale") as h:
        h.load(folder, "rr")
        with h.serving("service", h.env(folder.parent)) as svc:
            idle = svc.rss_mb()

            async def send() -> list[int]:
                return [(await load.request(svc.port, "POST", "/rerank", b))[0] for b in bodies]

            statuses = asyncio.run(send())
            after = svc.rss_mb()
    return {
        "items": len(item_ids),
        "requests": n_requests,
        "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "worker_rss_mb_loaded": [round(x, 1) for x in idle],
        "worker_rss_mb_after_requests": [round(x, 1) for x in after],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--length", type=int, default=10, help="interactions per user")
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--requests", type=int, default=300, help="POST /rerank to the service")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the data, model and logs (default: a temporary one, removed)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--no-service", action="store_true", help="skip the service's RSS")
    args = p.parse_args(argv)  # fmt: skip

    work = args.work or Path(tempfile.mkdtemp(prefix="rerank-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    data, models = work / "data", work / "models"
    shutil.rmtree(models, ignore_errors=True)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "scripts.scale_run", *(argv or sys.argv[1:])]),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "python": platform.python_version(),
        },
        "data": {
            "users": args.users,
            "items": args.items,
            "length": args.length,
            "interactions": args.users * args.length,
        },  # fmt: skip
    }
    print(f"scale run in {work}: {result['data']}", file=sys.stderr)
    gen = run_measured(
        rerank("data", "synthetic", "--users", str(args.users), "--items", str(args.items),
               "--length", str(args.length), "--seed", str(args.seed), "--out", str(data)),
        work / "data.log",
        work,
    )  # fmt: skip
    result["generate"] = gen
    if gen["rc"] != 0:
        print((work / "data.log").read_text()[-3000:], file=sys.stderr)
        return 1
    train_log = work / "train.log"
    train = run_measured(
        rerank("train", "--interactions", str(data / "interactions.csv"),
               "--items", str(data / "items.csv"), "--max-minutes", f"{args.max_minutes:g}",
               "--models-dir", str(models), "--version", "scale", "--seed", str(args.seed)),
        train_log,
        work,
    )  # fmt: skip
    train["step_seconds"] = step_seconds(train_log)
    folder = models / "scale"
    report_path = folder / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        train["report_minutes"] = report.get("minutes")
        train["report_minutes_per_step"] = report.get("minutes_per_step")
        train["offline_metrics"] = report.get("summary")
        train["epochs"] = report.get("train_log")  # how far the budget let the reranker go
    result["train"] = train
    if train["rc"] != 0:
        print(train_log.read_text(errors="replace")[-3000:], file=sys.stderr)
    elif not args.no_service:
        result["service"] = service_rss(folder, args.requests, args.seed)

    peak_gb = max(train["peak_rss_mb_largest_process"], train["peak_rss_mb_tree_sampled"]) / 1e3
    checks = {
        "train_ok": train["rc"] == 0,
        f"wall <= {WALL_MAX_MIN:g} min": train["wall_s"] / 60 <= WALL_MAX_MIN,
        f"peak RSS <= {RSS_MAX_GB:g} GB": peak_gb <= RSS_MAX_GB,
    }
    if "service" in result:
        rss = max(result["service"]["worker_rss_mb_after_requests"])
        checks[f"service RSS <= {SERVICE_RSS_MAX_MB:g} MB"] = rss <= SERVICE_RSS_MAX_MB
    result["checks"] = checks
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"scale-{datetime.now(UTC):%Y-%m-%d}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(checks), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
