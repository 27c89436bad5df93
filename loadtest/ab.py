"""Two settings of the service side by side, on one Redis, one traffic, in one run.

    python -m loadtest.ab --a RERANK_MODEL_INLINE_MS=0 --b RERANK_MODEL_INLINE_MS=5

Both services run at once, on bench's model and traffic (``loadtest.bench``: the same files,
the same histories stored; its traffic and model flags pass through), and are driven one at
a time, in turns whose order alternates from round to round (A B, B A, ...): open loop at
``--rate`` req/s, then closed loop at each of ``--closed`` connections. This box's speed
moves by more than a change of a few tens of percent from one minute to the next
(docs/benchmark.md, Spread between runs), so one figure per side is no comparison: each turn
of A is paired with the turn of B beside it, and the result is the median of the pairs'
ratios B / A with the range of the pairs. The figures go to
``loadtest/results/ab-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from loadtest import bench
from loadtest.harness import ROOT, harness, relative
from loadtest.profile import paced

# ---- Parameters (each one is also a flag) ---------------------------------------------------
RATE = 200.0  # req/s open loop: under half of one worker's max on a 2-core box, nothing shed
SECONDS = 8.0  # per turn
ROUNDS = 6
CLOSED = (1, 4, 64, 256)  # closed-loop connections
WARMUP_S = 3.0
PAUSE_S = 0.5  # between turns: the last turn's connections are closed
RESULTS = ROOT / "loadtest" / "results"


def log(*parts: object) -> None:
    bench.log(*parts)


def setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("RERANK_"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected RERANK_NAME=value")
    return name, value


def closed(
    port: int, requests: list[bytes], connections: int, seconds: float, pid: int
) -> dict[str, Any]:
    """One closed-loop turn: goodput, the p99 of the 200s, the service's CPU per 200."""
    level = uvloop.run(bench.closed_level(port, requests, connections, seconds, {"s": [pid]}))
    return {
        "goodput_rps": level["goodput_rps"],
        "ok_p99_ms": level["ok_latency_ms"]["p99"],
        "shed": level["shed"],
        "errors": level["errors"],
        "cpu_ms_per_request": level["cpu_ms_per_request"]["s"],
    }


def pairs(turns: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Each round's B / A of ``key``, their median and range, and each side's median."""
    a = [t["a"][key] for t in turns]
    b = [t["b"][key] for t in turns]
    ratios = [y / x for x, y in zip(a, b, strict=True) if x]
    return {
        "a_median": statistics.median(a),
        "b_median": statistics.median(b),
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios, default=None),
        "ratio_max": max(ratios, default=None),
        "b_lower_in": sum(r < 1 for r in ratios),
        "pairs": len(ratios),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    bargs = bench.parse(args.bench_args)
    folder, _, traffic = bench.model_and_traffic(bargs)
    sides = {"a": dict(args.a), "b": dict(args.b)}
    scenarios = [("open", None), *(("closed", n) for n in args.closed)]
    turns: dict[str, list[dict[str, Any]]] = {
        f"{kind}-{n}" if n else kind: [] for kind, n in scenarios
    }
    with harness("rr", name="rerank-ab") as h:
        h.load(folder)
        bench.store_histories(h, "rr", traffic["users"])
        with (
            h.serving("a", h.env(folder.parent, **sides["a"])) as svc_a,
            h.serving("b", h.env(folder.parent, **sides["b"])) as svc_b,
        ):
            servers = {"a": svc_a, "b": svc_b}
            requests = {
                name: bench.payloads(traffic, s.port, bargs.candidates, bargs.k, bargs.n_requests)
                for name, s in servers.items()
            }
            for name, s in servers.items():
                paced(s.port, requests[name], args.rate, args.warmup, [s.pid])
            for r in range(args.rounds):
                order = ["a", "b"] if r % 2 == 0 else ["b", "a"]
                for kind, n in scenarios:
                    key = f"{kind}-{n}" if n else kind
                    turn: dict[str, Any] = {}
                    for name in order:
                        s, sent = servers[name], requests[name]
                        if n is None:
                            turn[name] = paced(s.port, sent, args.rate, args.seconds, [s.pid])
                        else:
                            turn[name] = closed(s.port, sent, n, args.seconds, s.pid)
                        time.sleep(PAUSE_S)
                    turns[key].append(turn)
                    log(f"round {r + 1} {key}: " + "  ".join(
                        f"{name} {summary_line(turn[name])}" for name in ("a", "b")
                    ))  # fmt: skip
    compared: dict[str, Any] = {"open": {
        "cpu_ms_per_request": pairs(turns["open"], "cpu_ms_per_request"),
        "p99_ms": pairs(turns["open"], "p99_ms"),
    }}  # fmt: skip
    for n in args.closed:
        t = turns[f"closed-{n}"]
        compared[f"closed-{n}"] = {
            "goodput_rps": pairs(t, "goodput_rps"),
            "ok_p99_ms": pairs(t, "ok_p99_ms"),
            "cpu_ms_per_request": pairs(t, "cpu_ms_per_request"),
        }
    return {
        "command": " ".join(["python -m loadtest.ab", *args.argv]),
        "model": folder.name,
        "a": sides["a"],
        "b": sides["b"],
        "rate": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "compared": compared,
        "turns": turns,
    }


def summary_line(turn: dict[str, Any]) -> str:
    if "goodput_rps" in turn:
        return f"{turn['goodput_rps']:.0f} req/s, {turn['cpu_ms_per_request']:.2f} ms CPU"
    return f"{turn['cpu_ms_per_request']:.2f} ms CPU, p99 {turn['p99_ms']:.1f} ms"


def markdown(result: dict[str, Any]) -> str:
    def side(s: dict[str, str]) -> str:
        return " ".join(f"`{k}={v}`" for k, v in s.items()) or "defaults"

    lines = [
        f"# Side by side {time.strftime('%Y-%m-%d')}",
        "",
        f"`{result['command']}`; model `{result['model']}`; {result['rounds']} rounds of "
        f"{result['seconds']:g} s turns, order alternating. A: {side(result['a'])}. "
        f"B: {side(result['b'])}.",
        "",
        "| scenario | figure | A (median) | B (median) | B / A, median of pairs | range | "
        "pairs where B is lower |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, figures in result["compared"].items():
        name = f"open loop, {result['rate']:g} req/s" if scenario == "open" else (
            f"closed loop, {scenario.split('-')[1]} connections"
        )  # fmt: skip
        for figure, p in figures.items():
            lines.append(
                f"| {name} | {figure} | {bench.fmt(p['a_median'], 2)} | "
                f"{bench.fmt(p['b_median'], 2)} | {bench.fmt(p['ratio_median'], 3)} | "
                f"{bench.fmt(p['ratio_min'], 2)}-{bench.fmt(p['ratio_max'], 2)} | "
                f"{p['b_lower_in']} of {p['pairs']} |"
            )
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--a", type=setting, action="append", default=[], help="RERANK_NAME=value of side A")
    a("--b", type=setting, action="append", default=[], help="RERANK_NAME=value of side B")
    a("--rate", type=float, default=RATE, help="req/s offered, open loop")
    a("--seconds", type=float, default=SECONDS, help="per turn")
    a("--rounds", type=int, default=ROUNDS)
    a("--closed", type=lambda s: [int(x) for x in s.split(",") if x], default=list(CLOSED),
      help="closed-loop connections, comma separated (empty: none)")  # fmt: skip
    a("--warmup", type=float, default=WARMUP_S)
    a("--out", type=Path, default=None, help="<out>.json and <out>.md "
      "(default loadtest/results/ab-<date>)")  # fmt: skip
    return bench.parse_with_bench_flags(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    result = run(args)
    out = args.out or RESULTS / f"ab-{time.strftime('%Y-%m-%d')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {relative(out.with_suffix('.json'))} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
