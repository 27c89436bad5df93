"""`make profile`: where the service's CPU goes per request, by sampling, at one paced rate.

    python -m loadtest.profile                      # loadtest/results/profile.svg, top frames
    python -m loadtest.profile --no-profile         # only the CPU per request (no profiler)

The service is started as ``make bench`` starts it (``loadtest.harness``), on bench's model
and traffic (``loadtest.bench``: the same files, the same histories stored; its traffic and
model flags pass through), and driven open loop (``loadtest.load``) at ``--rate`` req/s:

1. ``--rounds`` runs of ``--seconds`` without the profiler: the CPU of the service's
   processes per answered request, split into its event loop thread and its other threads
   (the batcher's ONNX thread), each round's figures and their median;
2. the same rate under py-spy (``py-spy record --pid --gil``, ``--sample-rate`` samples a
   second) twice: once as a flame graph (``<out>.svg``), once as collapsed stacks
   (``<out>-stacks.txt``), summed into the top frames by own samples (the function on top
   of the stack) and by total samples (the function anywhere in the stack), printed and
   written to ``<out>-top.md``.

``--gil`` samples the thread that holds the GIL: the Python work, which is what the service
adds to its floors (the ONNX run releases the GIL and is the model floor's). Without it
(``--all-threads``) py-spy counts a thread as busy whenever the kernel has it runnable, and
on a loaded machine the batcher's thread waiting in its queue and the event loop in epoll
then fill half the samples.

py-spy reads the service's memory from outside (ptrace, which works for root or with
CAP_SYS_PTRACE); it pauses the service for each sample, which moves latency, not the
service's CPU, and the CPU figures of step 1 are taken without it. Where ptrace is refused,
``--nonblocking`` (no pause) is the first thing to try.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import uvloop

from loadtest import bench, load
from loadtest.harness import ROOT, cpu_seconds, harness, relative

# ---- Parameters (each one is also a flag) ---------------------------------------------------
RATE = 60.0  # req/s: well under one worker's max on a 2-core box beside its Redis and generator
SECONDS = 20.0  # per round, and per profile
ROUNDS = 3
WARMUP_S = 3.0
SAMPLE_RATE = 200  # py-spy samples a second: 4,000 samples in 20 s
TOP = 25  # frames in each table
OUT = ROOT / "loadtest" / "results" / "profile"


def log(*parts: object) -> None:
    bench.log(*parts)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's event loop thread (its main one) and of its other threads
    together (the batcher's ONNX thread, mostly)."""
    loop = other = 0.0
    for t in psutil.Process(pid).threads():
        if t.id == pid:
            loop += t.user_time + t.system_time
        else:
            other += t.user_time + t.system_time
    return {"event_loop": loop, "other_threads": other}


def paced(
    port: int, requests: list[bytes], rate: float, seconds: float, pids: list[int]
) -> dict[str, Any]:
    """One open-loop run: answered, errors, p50/p99, the service's CPU ms per answer (all its
    processes, and the first one's split by thread)."""

    async def main() -> tuple[load.Run, float, dict[str, float]]:
        cpu0, threads0 = cpu_seconds(pids), thread_cpu(pids[0])
        run = await load.open_loop(port, requests, rate, seconds)
        threads = {k: v - threads0[k] for k, v in thread_cpu(pids[0]).items()}
        return run, cpu_seconds(pids) - cpu0, threads

    run, cpu, threads = uvloop.run(main())
    s = run.summary(rate)
    ok = max(1, s["ok"])
    return {
        "ok": s["ok"],
        "errors": s["errors"],
        "shed": s["shed"],
        "degraded": s["degraded"],
        "p50_ms": s["latency_ms"]["p50"],
        "p99_ms": s["latency_ms"]["p99"],
        "cpu_ms_per_request": 1000 * cpu / ok,
        "thread_cpu_ms_per_request": {k: 1000 * v / ok for k, v in threads.items()},
    }


def record(pid: int, out: Path, fmt: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid`` for ``args.seconds``, in the background."""
    cmd = [
        str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
        "--rate", str(args.sample_rate), "--duration", str(round(args.seconds)),
        "--format", fmt, "--output", str(out),
    ]  # fmt: skip
    if args.nonblocking:
        cmd.append("--nonblocking")
    if not args.all_threads:
        cmd.append("--gil")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profiled(
    port: int, requests: list[bytes], pid: int, out: Path, fmt: str, args: argparse.Namespace
) -> None:
    """The paced load for the length of one py-spy recording."""
    spy = record(pid, out, fmt, args)
    try:
        paced(port, requests, args.rate, args.seconds + 1.0, [pid])
    finally:
        _, err = spy.communicate(timeout=args.seconds + 60)
    if spy.returncode != 0 or not out.exists():
        raise SystemExit(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')}")
    if fmt == "flamegraph":  # its title is the command line: no paths of this machine in it
        text = re.sub(r"[^\s>]*/py-spy ", "py-spy ", out.read_text())
        out.write_text(re.sub(r"--output [^\s<]+", f"--output {out.name}", text))


FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """``function (path/to/file.py:12)`` as ``function (file.py)``: one row per function."""
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    short = "/".join(path.split("/")[-2:]) if "/app/" in path or "site-packages" in path else path
    if "site-packages/" in path:
        short = path.split("site-packages/", 1)[1]
    return f"{match.group('name')} ({short})"


def top_frames(collapsed: str, top: int) -> dict[str, Any]:
    """Own and total samples per function, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        samples += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    return {
        "samples": samples,
        "own": [(f, n / samples) for f, n in own.most_common(top)] if samples else [],
        "total": [(f, n / samples) for f, n in total.most_common(top)] if samples else [],
    }


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"{summary['samples']} samples; {meta['command']}",
        "",
        "| own % | function | | total % | function |",
        "|---|---|---|---|---|",
    ]
    for (fo, so), (ft, st) in zip(summary["own"], summary["total"], strict=False):
        lines.append(f"| {100 * so:.1f} | `{fo}` | | {100 * st:.1f} | `{ft}` |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    bargs = bench.parse(args.bench_args)
    folder, _, traffic = bench.model_and_traffic(bargs)
    result: dict[str, Any] = {"rate": args.rate, "seconds": args.seconds, "model": folder.name}
    with harness("rr", name="rerank-profile") as h:
        h.load(folder)
        bench.store_histories(h, "rr", traffic["users"])
        with h.serving("service", h.env(folder.parent)) as svc:
            requests = bench.payloads(
                traffic, svc.port, bargs.candidates, bargs.k, bargs.n_requests
            )
            pid = svc.workers()[0].pid
            paced(svc.port, requests, args.rate, args.warmup, [svc.pid])
            rounds = []
            for i in range(args.rounds):
                r = paced(svc.port, requests, args.rate, args.seconds, [svc.pid])
                rounds.append(r)
                split = r["thread_cpu_ms_per_request"]
                log(f"round {i + 1}: {r['cpu_ms_per_request']:.3f} CPU ms/request (event loop "
                    f"{split['event_loop']:.3f}, other threads {split['other_threads']:.3f}), "
                    f"p99 {r['p99_ms']:.2f} ms, {r['ok']} ok, {r['shed']} shed, "
                    f"{r['errors']} errors")  # fmt: skip
            result["rounds"] = rounds
            result["cpu_ms_per_request"] = statistics.median(
                r["cpu_ms_per_request"] for r in rounds
            )
            log(f"CPU ms per request at {args.rate:g} req/s: {result['cpu_ms_per_request']:.3f}")
            if args.profile:
                out = args.out
                out.parent.mkdir(parents=True, exist_ok=True)
                profiled(svc.port, requests, pid, out.with_suffix(".svg"), "flamegraph", args)
                raw = out.with_name(out.name + "-stacks.txt")
                profiled(svc.port, requests, pid, raw, "raw", args)
                summary = top_frames(raw.read_text(), args.top)
                meta = {"command": " ".join(["python -m loadtest.profile", *args.argv])}
                text = markdown(summary, meta)
                top_md = out.with_name(out.name + "-top.md")
                top_md.write_text(text)
                print(text)
                log(f"wrote {relative(out.with_suffix('.svg'))}, {relative(top_md)}")
    return result


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--rate", type=float, default=RATE, help="req/s offered, open loop")
    a("--seconds", type=float, default=SECONDS, help="per round and per profile")
    a("--rounds", type=int, default=ROUNDS, help="CPU-per-request rounds without the profiler")
    a("--warmup", type=float, default=WARMUP_S)
    a("--sample-rate", type=int, default=SAMPLE_RATE, help="py-spy samples a second")
    a("--top", type=int, default=TOP)
    a("--out", type=Path, default=OUT, help="<out>.svg and <out>-top.md")
    a("--nonblocking", action="store_true", help="py-spy does not pause the service to sample")
    a("--all-threads", action="store_true", help="every thread that is not idle, not only "
      "the one that holds the GIL")  # fmt: skip
    a("--no-profile", dest="profile", action="store_false", help="only the CPU per request")
    a("--json", action="store_true", help="print the result as JSON on stdout")
    return bench.parse_with_bench_flags(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    result = run(args)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
