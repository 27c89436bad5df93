"""Regenerate the README sections that come from committed files (``make readme``).

Sections are marked ``<!-- name:start -->`` ... ``<!-- name:end -->``:
settings (app/config.py), report (the default model's report.md), bench (the newest
benchmark summary in loadtest/results/), chaos (the newest chaos run), readme-answer (the
README's own curl example, replayed against the default model on an embedded Redis).
tests/test_readme.py fails when the README and these files disagree.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "loadtest" / "results"


def newest(pattern: str) -> Path | None:
    found = sorted(RESULTS.glob(pattern))
    return found[-1] if found else None


def bench_summary() -> str | None:
    runs = sorted(RESULTS.glob("20*-*.md"))
    if not runs:
        return None
    text = runs[-1].read_text()
    table = text.split("## Against the standard", 1)[1].split("\n## ", 1)[0].strip()
    return f"From `loadtest/results/{runs[-1].name}`:\n\n{table}"


def chaos_table() -> str | None:
    path = newest("chaos-*.json")
    if path is None:
        return None
    rows = [
        f"From `loadtest/results/{path.name}`:",
        "",
        "| fault | sent | 200 | degraded 200 | 503 shed | other errors | worst ms | recovery s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    document = json.loads(path.read_text())
    scenarios = document["scenarios"]
    for s in scenarios:
        recovery = "-" if s["recovery_s"] is None else s["recovery_s"]
        rows.append(
            f"| {s['scenario']} | {s['sent']} | {s['normal']} | {s['degraded']} | {s['shed']} "
            f"| {s['errors']} | {s['worst_fault_ms']} | {recovery} |"
        )
    over = next((s["extra"] for s in scenarios if s["scenario"] == "overload"), None)
    if over and "accepted_p99_ms" in over:
        rows += [
            "",
            f"Overload: {over['offered_rps']} req/s offered for "
            f"{document['parameters']['OVERLOAD_S']:g} s against a measured capacity "
            f"of {over['capacity_rps']} req/s (the most answered with p99 <= 50 ms, by the "
            f"open-loop ladder of loadtest/gen.py); {over['accepted_rps']} req/s accepted with p99 "
            f"{over['accepted_p99_ms']} ms (p50 {over['accepted_p50_ms']} ms) against "
            f"{over['unloaded_p99_ms']} ms unloaded "
            f"({over['accepted_p99_ms'] / over['unloaded_p99_ms']:.2f}x), the rest 503; "
            f"resident memory {over['rss_before_mb']} -> {over['rss_peak_mb']} MB. Latency "
            "counts from each request's due time, the generator's own send lag included.",
        ]
        if "accepted_p99_since_sent_ms" in over:
            sent, quiet = over["accepted_p99_since_sent_ms"], over["unloaded_p99_since_sent_ms"]
            rows[-1] += (
                f" From the moment each was written instead: {sent} against {quiet} ms "
                f"({sent / quiet:.2f}x)."
            )
    return "\n".join(rows)


def model_report() -> str | None:
    from contract import default_version

    version = default_version(ROOT / "models")
    return None if version is None else (ROOT / "models" / version / "report.md").read_text()


def example_calls(readme: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, JSON body) of each curl command of the README's example section."""
    after_start = readme.split("<!-- readme-example:start -->", 1)[1]
    example = after_start.split("<!-- readme-example:end", 1)[0]
    calls = []
    for line in example.replace("\\\n", " ").splitlines():
        if line.startswith("curl"):
            words = shlex.split(line)
            url = next(w for w in words if w.startswith("localhost:"))
            calls.append((url.split(":8000", 1)[1], json.loads(words[words.index("-d") + 1])))
    return calls


def example_answer(readme: str) -> str | None:
    """The last answer of the README's example, from the default model as served."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.embedded import EmbeddedRedis
    from app.factory import create_app
    from app.loader import load_into_redis
    from contract import default_version

    models = ROOT / "models"
    version = default_version(models)
    if version is None:
        return None
    with EmbeddedRedis() as redis_server:
        load_into_redis(redis_server.url, models / version, "rr")
        settings = Settings(_env_file=None, redis_url=redis_server.url, model_dir=models)  # type: ignore[call-arg]
        with TestClient(create_app(settings)) as client:
            answers = [client.post(path, json=body) for path, body in example_calls(readme)]
    return "```json\n" + json.dumps(answers[-1].json(), indent=2) + "\n```"


def sections(readme: str) -> dict[str, str | None]:
    from app.config import settings_table

    return {
        "settings": settings_table(),
        "report": model_report(),
        "bench": bench_summary(),
        "chaos": chaos_table(),
        "readme-answer": example_answer(readme),
    }


def render(readme: str) -> str:
    for name, body in sections(readme).items():
        if body is None:
            continue
        text = body.strip()

        def fill(m: re.Match[str], text: str = text) -> str:  # not a template: no escapes
            return m.group(1) + text + "\n" + m.group(2)

        readme = re.sub(
            rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", fill, readme, flags=re.S
        )
    return readme


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
