"""The pipeline on fused recall lists, its model folder's recall channels, and ``rerank
recall`` writing /rerank bodies that a running app accepts (synthetic data, seconds)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from app.schemas import request_models
from contract import verify_folder
from tests.test_training import _cfg
from training.cli import main as cli
from training.data import synthetic_tables
from training.files import Interactions, read_dataset, write_files
from training.fusion import candidate_features
from training.pipeline import run
from training.recall_lists import Remapped

VERSION = "fused-test"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_files(root, *synthetic_tables(200, 120, 25, 0.7, 0))


@pytest.fixture(scope="module")
def folder(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dataset = read_dataset(*files, say=None)
    return run(dataset, tmp_path_factory.mktemp("models"), _cfg(epochs=3), version=VERSION)


def test_the_model_reads_the_fused_lists_features(folder: Path) -> None:
    manifest = verify_folder(folder)
    names = ["ease", "markov", "sasrec", "item-knn", "als"]
    assert list(manifest.candidate_features or ()) == candidate_features(names)
    assert manifest.inputs is not None and manifest.inputs[-1] == "cand_feats"
    assert manifest.model_config is not None and manifest.model_config["n_feats"] == 10
    spec = json.loads((folder / "recall" / "channels.json").read_text())
    assert spec["channels"] == names and spec["sasrec"] == "sasrec.pt"
    assert (folder / "recall" / "sasrec.pt").stat().st_size > 0
    report = json.loads((folder / "report.json").read_text())
    assert set(report["summary"]) == {"fused", "item-knn"}
    assert set(report["channels"]) == set(names)
    assert {"train", "evaluate", "fit sasrec", "time-cut fit sasrec"} <= set(
        report["minutes_per_step"]
    )
    # The planted order is learnt on the fused lists, and lists of plain ids still rank.
    fused, knn = report["summary"]["fused"], report["summary"]["item-knn"]
    assert fused["deep reranker"]["ndcg@10"] > fused["popularity order"]["ndcg@10"]
    assert knn["deep reranker"]["ndcg@10"] > 1.5 * knn["recall order"]["ndcg@10"]
    assert "lightgbm lambdarank" in fused and "ease_rank" in report["lightgbm"]["features"]
    assert "| ease |" in (folder / "report.md").read_text()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_recall_writes_rerank_bodies_that_the_app_accepts(
    folder: Path,
    files: tuple[Path, Path],
    tmp_path: Path,
    redis_server: EmbeddedRedis,
    prefix: str,
    settings_factory: Callable[..., Settings],
) -> None:
    out = tmp_path / "lists.jsonl"
    assert cli(["recall", "--interactions", str(files[0]), "--items", str(files[1]),
                "--model", str(folder), "--k", "20", "--out", str(out)]) == 0  # fmt: skip
    lines = _lines(out)
    assert len(lines) == 200
    log = Interactions(*_read_log(files[0]))
    names = {str(f["name"]) for f in candidate_features(
        ["ease", "markov", "sasrec", "item-knn", "als"])}  # fmt: skip
    rerank_model, _ = request_models(settings_factory(max_candidates=100))
    for line in lines:
        assert set(line) == {"user_id", "candidates"}
        ids = [c["id"] for c in line["candidates"]]
        assert len(ids) == 20 and len(set(ids)) == 20
        assert not set(ids) & set(log.items[log.users == line["user_id"]].tolist()), "past items"
        for c in line["candidates"]:
            assert set(c["features"]) <= names
        assert ids[0] and rerank_model.model_validate(line)
    # The best candidate carries the best fused ranks.
    first = lines[0]["candidates"][0]["features"]
    assert min(v for k, v in first.items() if k.endswith("_rank")) <= 3

    models = folder.parent
    load_into_redis(redis_server.url, folder, prefix)
    with TestClient(create_app(settings_factory(model_dir=models))) as client:
        for line in lines[:5]:
            response = client.post("/rerank", json=line)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["model_version"] == VERSION and not answer["degraded"]
            assert answer["missing"] == []
            assert {i["item_id"] for i in answer["items"]} <= {c["id"] for c in line["candidates"]}


def _read_log(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pandas as pd

    df = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
    return (
        df["user_id"].to_numpy(object),
        df["item_id"].to_numpy(object),
        df["timestamp"].to_numpy(),
    )


def test_recall_without_a_model_leaves_sasrec_out_and_says_so(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lists.jsonl"
    assert cli(["recall", "--interactions", str(files[0]), "--k", "5", "--out", str(out)]) == 0
    assert "sasrec channel is left out" in capsys.readouterr().err
    lines = _lines(out)
    assert len(lines) == 200 and all(len(x["candidates"]) == 5 for x in lines)
    used = {k for x in lines for c in x["candidates"] for k in c["features"]}
    assert used and not any(k.startswith("sasrec") for k in used)


def test_recall_refuses_bad_files_with_named_problems(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "interactions.csv"
    bad.write_text("user_id,item_id,timestamp\nu1,i1,notatime\n")
    out = tmp_path / "lists.jsonl"
    assert cli(["recall", "--interactions", str(bad), "--k", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "timestamp" in err and "line 2" in err
    assert not out.exists()
    assert cli(["recall", "--interactions", str(files[0]), "--model", str(tmp_path),
                "--k", "5", "--out", str(out)]) == 2  # fmt: skip
    assert "manifest.json" in capsys.readouterr().err


def test_remapped_channel_answers_in_this_catalogues_rows() -> None:
    class Inner:
        name = "inner"

        def __init__(self) -> None:
            self.seen: list[list[int]] = []

        def recall(self, histories: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
            self.seen = [h.tolist() for h in histories]
            return np.array([[3, 1, 2][:n]]), np.array([[3.0, 2.0, 1.0][:n]])

    # This catalogue's rows 1..4 are the inner rows 2, 0 (unknown), 3, 1.
    inner = Inner()
    channel = Remapped(inner, np.array([0, 2, 0, 3, 1]), inner_items=3)
    items, scores = channel.recall([np.array([1, 2])], 3)
    assert inner.seen == [[2]], "an item the channel does not know leaves the history"
    assert items.tolist() == [[3, 4, 1]] and scores.tolist() == [[3.0, 2.0, 1.0]]
    channel = Remapped(inner, np.array([0, 2, 3, 0]), inner_items=3)  # inner row 1 unknown
    items, scores = channel.recall([np.array([1])], 3)
    assert items.tolist() == [[2, 1, 0]] and scores[0, 2] == -np.inf
