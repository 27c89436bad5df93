"""Write afresh the sections of README.md and docs/ that come from committed files.

``make readme`` runs this. A section is marked ``<!-- name:start -->`` ... ``<!-- name:end -->``
and sits in one document:

- settings (README.md): the fields of app/config.py;
- readme-answer (README.md): the README's own curl example, replayed against the default
  model on an embedded Redis;
- report (docs/model.md): the default model's report.md;
- bench (docs/benchmark.md): the newest benchmark summary in loadtest/results/;
- chaos (docs/reliability.md): the newest chaos run in loadtest/results/.

tests/test_readme.py fails when a document and these files disagree.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "loadtest" / "results"
# Every document that holds generated sections, relative to ROOT.
DOCUMENTS = ("README.md", "docs/model.md", "docs/benchmark.md", "docs/reliability.md")


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
            f"open-loop ladder of loadtest/load.py); {over['accepted_rps']} req/s accepted "
            f"with p99 "
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
    closed = next((s for s in scenarios if s["scenario"] == "overload_closed_loop"), None)
    if closed:
        c = closed["extra"]
        rows += [
            "",
            f"Closed loop: {c['connections']} callers for {c['seconds']:g} s, each sending again "
            f"as soon as it is answered (Retry-After ignored): {c['goodput_rps']} req/s of 200s "
            f"with p99 {c['accepted_p99_ms']} ms, {closed['shed']} refused.",
        ]
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
    return "```json\n" + _one_item_a_line(answers[-1].json()) + "\n```"


def _one_item_a_line(answer: dict[str, Any]) -> str:
    """JSON of an answer with one line per field and per item: short enough to read."""
    lines = ["{"]
    for n, (key, value) in enumerate(answer.items()):
        comma = "," if n < len(answer) - 1 else ""
        if key == "items" and value:
            lines.append(f"  {json.dumps(key)}: [")
            lines += [f"    {json.dumps(item)}," for item in value]
            lines[-1] = lines[-1].rstrip(",")
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def settings_section(_: str) -> str:
    from app.config import settings_table

    return settings_table()


# Section name -> its text, given the whole document it sits in (the README's example answer
# is computed from the README's own example).
SECTIONS: dict[str, Callable[[str], str | None]] = {
    "settings": settings_section,
    "report": lambda _: model_report(),
    "bench": lambda _: bench_summary(),
    "chaos": lambda _: chaos_table(),
    "readme-answer": example_answer,
}


def render(document: str) -> str:
    """``document`` with each generated section it holds written afresh."""
    for name, make in SECTIONS.items():
        if f"<!-- {name}:start -->" not in document:
            continue
        body = make(document)
        if body is None:
            continue
        text = body.strip()

        def fill(m: re.Match[str], text: str = text) -> str:  # not a template: no escapes
            return m.group(1) + text + "\n" + m.group(2)

        document = re.sub(
            rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", fill, document, flags=re.S
        )
    return document


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for name in DOCUMENTS:
        path = ROOT / name
        path.write_text(render(path.read_text()))
