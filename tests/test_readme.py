"""The README's and docs/' promises are the project's behaviour: settings, quick start,
example, and the generated report, benchmark and chaos sections."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings, settings_table
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from contract import default_version
from scripts.update_readme import DOCUMENTS, SECTIONS, example_calls, render

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODELS = ROOT / "models"


def section(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} section"
    return match.group(1)


def test_settings_table_matches_the_code() -> None:
    assert section("settings").strip() == settings_table().strip()


@pytest.mark.parametrize("name", DOCUMENTS)
def test_generated_sections_match_their_files(name: str) -> None:
    """Report, benchmark and chaos figures are the committed results (`make readme`)."""
    text = (ROOT / name).read_text()
    assert render(text) == text, f"{name} is stale: run `make readme`"


def test_every_generated_section_sits_in_one_document() -> None:
    texts = {name: (ROOT / name).read_text() for name in DOCUMENTS}
    for section_name in SECTIONS:
        holders = [name for name, text in texts.items() if f"<!-- {section_name}:start -->" in text]
        assert len(holders) == 1, f"section {section_name} is in {holders or 'no document'}"


def test_quick_start_is_two_make_targets_that_exist() -> None:
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^    (make \S+)", quick, re.M)
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "train", "eval", "bench", "lint", "docker", "install"):
        assert re.search(rf"^(\S+ )*{target}( \S+)*:", makefile, re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(default_version(MODELS) is None, reason="no default model yet")
def test_example_answer_is_what_the_default_model_says(
    redis_server: EmbeddedRedis, prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    version = default_version(MODELS)
    load_into_redis(redis_server.url, MODELS / str(version), prefix)
    shown = json.loads(section("readme-answer").split("```json", 1)[1].split("```", 1)[0])
    settings = settings_factory(model_dir=MODELS)
    with TestClient(create_app(settings)) as client:
        answers = [client.post(path, json=body) for path, body in example_calls(README)]
    assert [a.status_code for a in answers] == [200, 200]
    got = answers[-1].json()
    assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in shown["items"]]
    for mine, theirs in zip(got["items"], shown["items"], strict=True):
        if theirs["score"] is not None:
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-3)
    assert got["missing"] == shown["missing"] and got["model_version"] == shown["model_version"]
