"""The benchmark cannot rot: a smoke run of loadtest.bench, structure checked, no timings.

It starts its own redis-server, service, floors and peer on this machine's loopback, drives
a tiny ladder for a few seconds, and writes the result files; the assertions only read
their shape. Numbers are never asserted: a benchmark is not a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.embedded import EmbeddedRedis
from app.loader import load_into_redis
from contract import verify_folder
from tests.conftest import ITEMS_A, VERSION_A, Towered

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_results(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable, "-m", "loadtest.bench", "--smoke",
            "--model-dir", str(model_dir / VERSION_A), "--out-dir", str(out),
            "--traffic-dir", str(tmp_path / "traffic"), "--machine", "smoke",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    [result] = list(out.glob("*-smoke.json"))
    assert result.with_suffix(".md").is_file()
    assert result.with_suffix(".png").stat().st_size > 0
    res = json.loads(result.read_text())

    assert res["meta"]["model_version"] == VERSION_A
    assert res["meta"]["traffic"]["source"] == "popularity-random"
    for name in ("service", "peer"):
        ladder = res[name]
        assert ladder["rungs"], name
        for rung in ladder["rungs"]:
            assert rung["requests"] == rung["ok"] + rung["shed"] + rung["errors"]
            assert set(rung["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}
            assert {"degraded", "shed", "errors", "achieved_rps", "offered_rps"} <= set(rung)
            assert {"cpu_cores", "send_lag_ms"} <= set(rung["generator"])
    floors = res["floors"]
    for part in ("model", "redis", "http"):
        assert floors[part]["cpu_ms_per_request"] > 0, part
    assert floors["model"]["batch_sizes"]
    assert floors["sum_cpu_ms_per_request"] > 0
    # Paced floors (the standard's) and hot-loop ones (the lower bound) are both reported.
    for part in ("model", "redis"):
        assert floors[part]["hot_cpu_ms_per_request"] > 0, part
        assert floors[part]["rate"] == floors["at_offered_rps"], part
    assert floors["service_over_hot_floors"] > 0
    scaling = res["scaling"]
    assert [c["candidates"] for c in scaling["candidates"]] == res["params"]["sweep_candidates"]
    assert [c["items"] for c in scaling["catalogue"]] == [200, res["params"]["catalogue"]]
    assert all(c["redis_bytes_per_item"] > 0 for c in scaling["catalogue"])
    assert [w["workers"] for w in scaling["workers"]] == res["params"]["workers"]
    closed = res["closed_loop"]
    assert [lv["connections"] for lv in closed["levels"]] == res["params"]["closed_connections"]
    for level in closed["levels"]:
        assert level["requests"] == level["ok"] + level["shed"] + level["errors"]
        assert level["goodput_rps"] > 0
        assert {"p50", "p99"} <= set(level["ok_latency_ms"])
    assert "## Service, closed loop" in result.with_suffix(".md").read_text()
    feats = res["features"]  # the same rate with and without recall features
    assert len(feats["names"]) == 10 and feats["cpu_ratio"] > 0
    for label in ("plain", "features"):
        assert feats[label]["ok"] > 0 and feats[label]["errors"] == 0, label
    assert "## Recall features in the requests" in result.with_suffix(".md").read_text()
    assert set(res["standards"]) == {
        "features",
        "throughput_vs_peer",
        "efficiency",
        "p99_at_half",
        "worker_rss",
        "closed_loop",
    }
    for check in res["standards"].values():
        assert isinstance(check["met"], bool)
    # Committed results name no path of the machine that ran them.
    assert not any(str(v).startswith("/") for v in res["params"].values())
    assert not res["meta"]["model_dir"].startswith("/")


def test_the_split_option_serves_the_model_twice_50_50(
    model_dir: Path, redis_server: EmbeddedRedis, prefix: str
) -> None:
    import types

    import redis

    from loadtest.bench import parse, split_versions

    assert parse(["--split"]).split and not parse([]).split
    client = redis.Redis.from_url(redis_server.url)
    try:
        load_into_redis(redis_server.url, model_dir / VERSION_A, prefix)
        h = types.SimpleNamespace(
            url=redis_server.url, client=lambda: redis.Redis.from_url(redis_server.url)
        )
        split_versions(h, model_dir / VERSION_A, prefix)  # type: ignore[arg-type]
        split = json.loads(client.get(f"{prefix}:split") or b"")
        assert split == {"shares": [[VERSION_A, 50], [f"{VERSION_A}-b", 50]]}
    finally:
        client.close()


def test_the_efficiency_standard_reads_the_hot_floors_with_the_paced_ratio_beside() -> None:
    from loadtest.bench import EFFICIENCY_STANDARD, efficiency_check

    floors = {"service_over_hot_floors": 1.7, "service_over_floors": 1.2}
    check = efficiency_check(floors)
    assert check["value"] == 1.7
    assert check["standard"] == "<= 1.75" and EFFICIENCY_STANDARD == 1.75
    assert check["met"] is True
    assert "hot floors" in check["what"] and "1.20" in check["note"]
    assert efficiency_check({**floors, "service_over_hot_floors": 1.8})["met"] is False


def test_the_synthetic_catalogue_of_a_model_with_an_item_tower_is_a_valid_folder(
    towered: Towered, tmp_path: Path
) -> None:
    """The catalogue run copies the graph with random vectors: the tower stays behind, and the
    manifest says so (a manifest naming item_tower.onnx without its file is refused)."""
    from loadtest.bench import synthetic_model

    folder = synthetic_model(towered.models / ITEMS_A, tmp_path, 50, seed=0)
    manifest = verify_folder(folder)
    assert manifest.n_items == 50 and manifest.tower is None


def test_the_naive_peer_answers_with_a_model_that_declares_recall_features(
    towered: Towered, redis_server: EmbeddedRedis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer feeds the features' defaults to a graph with cand_feats, as the service does
    for plain ids; without them every request was a 500 and the peer's ladder empty."""
    import importlib

    from fastapi.testclient import TestClient

    folder = towered.models / ITEMS_A
    load_into_redis(redis_server.url, folder, prefix)
    monkeypatch.setenv("NAIVE_MODEL", str(folder))
    monkeypatch.setenv("NAIVE_PREFIX", prefix)
    monkeypatch.setenv("NAIVE_REDIS_URL", redis_server.url)
    import loadtest.peers.naive as naive

    naive = importlib.reload(naive)
    ids = towered.dataset.item_ids
    with TestClient(naive.app) as client:
        answer = client.post("/rerank", json={"user_id": "u", "candidates": ids[:20], "k": 5})
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert len(items) == 5 and all(i["score"] is not None for i in items)
