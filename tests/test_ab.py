"""loadtest/ab.py's pairing of turns and its table (no service runs here)."""

from __future__ import annotations

import argparse

import pytest

from loadtest.ab import markdown, pairs, parse, setting


def test_each_round_is_a_pair_and_the_result_is_the_median_of_their_ratios() -> None:
    turns = [
        {"a": {"cpu": 4.0}, "b": {"cpu": 3.0}},
        {"a": {"cpu": 2.0}, "b": {"cpu": 2.2}},
        {"a": {"cpu": 5.0}, "b": {"cpu": 4.0}},
    ]
    p = pairs(turns, "cpu")
    assert p["ratio_median"] == pytest.approx(0.8)  # of 0.75, 1.1 and 0.8; not 3.0 / 4.0
    assert (p["ratio_min"], p["ratio_max"]) == (pytest.approx(0.75), pytest.approx(1.1))
    assert (p["a_median"], p["b_median"]) == (4.0, 3.0)
    assert (p["b_lower_in"], p["pairs"]) == (2, 3)


def test_settings_are_rerank_variables_and_the_table_names_both_sides() -> None:
    args = parse(["--a", "RERANK_MODEL_INLINE_MS=0", "--b", "RERANK_MODEL_INLINE_MS=5",
                  "--closed", "1,4", "--model-dir", "models"])  # fmt: skip
    assert args.a == [("RERANK_MODEL_INLINE_MS", "0")] and args.closed == [1, 4]
    assert args.bench_args == ["--model-dir", "models"]  # bench's own flags pass through
    with pytest.raises(argparse.ArgumentTypeError, match="MAX_BATCH"):
        setting("MAX_BATCH=4")
    figure = {"a_median": 4.0, "b_median": 3.0, "ratio_median": 0.8, "ratio_min": 0.75,
              "ratio_max": 1.1, "b_lower_in": 2, "pairs": 3}  # fmt: skip
    table = markdown({
        "command": "python -m loadtest.ab", "model": "m", "rounds": 3, "seconds": 8.0,
        "rate": 200.0, "a": {"RERANK_MODEL_INLINE_MS": "0"}, "b": {"RERANK_MODEL_INLINE_MS": "5"},
        "compared": {"open": {"cpu_ms_per_request": figure},
                     "closed-4": {"goodput_rps": figure}},
    })  # fmt: skip
    assert "A: `RERANK_MODEL_INLINE_MS=0`. B: `RERANK_MODEL_INLINE_MS=5`." in table
    assert "| open loop, 200 req/s | cpu_ms_per_request | 4.00 | 3.00 | 0.800 |" in table
    assert "| closed loop, 4 connections | goodput_rps |" in table
