"""The admission target fixed (RERANK_ADMISSION_BASE_RATIO=0) against relative (the default),
side by side, arms alternating, on chaos.py's service, Redis and open-loop generator:

    .venv/bin/python loadtest/admission.py     # writes loadtest/results/admission-<date>.json

- ``busy``: two busy loops beside the service (a slower machine), then 80 req/s, a 3 s burst
  at 300, 80 req/s again: does the limit come back after the burst, or stay cut?
- ``overload``: chaos.py's overload scenario (3x capacity for 30 s), no busy loops.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python loadtest/admission.py` puts loadtest/ first
    sys.path.insert(0, str(ROOT))

from loadtest import chaos  # noqa: E402

RATIOS = ("0", "1.8")  # fixed, then the default relative target
REPEATS = 2
BUSY_LOOPS = 2
PHASES = (("before", 80.0, 6.0), ("burst", 300.0, 3.0), ("after", 80.0, 10.0))


def _gauges(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    found = re.findall(r"^rerank_admission_(\w+) (\S+)$", text, re.M)
    return {name: round(float(value), 4) for name, value in found}


async def busy(ratio: str) -> dict[str, Any]:
    with chaos.environment({"RERANK_ADMISSION_BASE_RATIO": ratio}) as env:
        payloads = chaos.overload_payloads(env, chaos.OVERLOAD_PAYLOADS)
        loops = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY_LOOPS)
        ]
        try:
            out: dict[str, Any] = {"ratio": ratio}
            for name, rate, seconds in PHASES:
                rec = await chaos.open_loop(env, payloads, rate, seconds)
                ok = rec.status == 200
                out[name] = {
                    "offered_rps": rate,
                    "answered_rps": round(float(ok.sum()) / seconds, 1),
                    "shed": int((rec.status == chaos.gen.SHED).sum()),
                    "other": int((~ok & (rec.status != chaos.gen.SHED)).sum()),
                    **_gauges(env.port),
                }
            return out
        finally:
            for loop in loops:
                loop.kill()


async def overload(ratio: str) -> dict[str, Any]:
    with chaos.environment({"RERANK_ADMISSION_BASE_RATIO": ratio}) as env:
        report = await chaos.overload(env)
        e = report.extra
        return {
            "ratio": ratio,
            "capacity_rps": e["capacity_rps"],
            "accepted_rps": e["accepted_rps"],
            "unloaded_p99_ms": e["unloaded_p99_ms"],
            "accepted_p99_ms": e["accepted_p99_ms"],
            "p99_ratio": round(e["accepted_p99_ms"] / e["unloaded_p99_ms"], 2),
            "errors": report.errors,
        }


async def run_all() -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"busy": [], "overload": []}
    for _ in range(REPEATS):
        for ratio in RATIOS:
            runs["busy"].append(await busy(ratio))
            print(json.dumps(runs["busy"][-1]), flush=True)
    for _ in range(REPEATS):
        for ratio in RATIOS:
            runs["overload"].append(await overload(ratio))
            print(json.dumps(runs["overload"][-1]), flush=True)
    return runs


def main() -> None:
    started = dt.datetime.now(dt.UTC)
    runs = uvloop.run(run_all())
    out = chaos.RESULTS / f"admission-{started:%Y-%m-%d}.json"
    document = {"started": started.isoformat(timespec="seconds"), "runs": runs}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
