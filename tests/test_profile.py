"""loadtest/profile.py's summary of py-spy's collapsed stacks (no profiler runs here)."""

from __future__ import annotations

import pytest

from loadtest.profile import frame_name, markdown, top_frames

MAIN = "main (app/cli.py:300);run (uvicorn/main.py:579)"
STACKS = "\n".join([
    f"process 12 (python -m app.cli);{MAIN};rerank (app/service.py:120);fetch (app/store.py:480) 6",
    f"{MAIN};rerank (app/service.py:121) 3",
    "main (app/cli.py:300);_loop (app/feedback.py:126);"
    "pack_command (/x/site-packages/redis/asyncio/connection.py:10) 1",
])  # fmt: skip


def test_top_frames_sum_own_and_total_samples_per_function() -> None:
    summary = top_frames(STACKS, top=3)
    assert summary["samples"] == 10
    own = dict(summary["own"])
    assert own["fetch (app/store.py)"] == pytest.approx(0.6)
    assert own["rerank (app/service.py)"] == pytest.approx(0.3)  # lines of one function: one row
    total = dict(summary["total"])
    assert total["main (app/cli.py)"] == pytest.approx(1.0)
    assert total["rerank (app/service.py)"] == pytest.approx(0.9)
    assert not any(name.startswith("process ") for name, _ in summary["total"])


def test_frame_names_drop_the_line_and_the_site_packages_prefix() -> None:
    assert frame_name("run (uvicorn/main.py:579)") == "run (uvicorn/main.py)"
    assert frame_name("f (/x/site-packages/redis/client.py:3)") == "f (redis/client.py)"
    table = markdown(top_frames(STACKS, top=2), {"command": "python -m loadtest.profile"})
    assert "| 60.0 | `fetch (app/store.py)` |" in table
