"""Candidates with recall features (docs/api.md): ids and {"id", "features"} objects mixed,
defaults for absent features, unknown names ignored and counted, bad values a 422 naming the
candidate; cand_feats fed only to a graph that declares it."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.errors import ModelError
from app.factory import create_app
from app.loader import load_into_redis
from app.model import Job, LoadedModel, load_session
from contract import verify_folder
from tests.conftest import HISTORY_LEN, N_ITEMS, VERSION_A

FEATURED = "test-feats"
FEATURES = [
    {"name": "ease_rank", "default": 1000.0},
    {"name": "ease_score", "default": 0.0},
    {"name": "markov_rank", "default": 1000.0},
]
DEFAULTS = np.array([1000.0, 0.0, 1000.0], np.float32)


@pytest.fixture(scope="module")
def featured_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_random_model

    root = tmp_path_factory.mktemp("featured")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        export_random_model(
            root, N_ITEMS, dim=16, history_len=HISTORY_LEN, version=FEATURED,
            candidate_features=FEATURES,
        )  # fmt: skip
    return root


@pytest.fixture
def client(
    redis_server: EmbeddedRedis, prefix: str, featured_dir: Path,
    settings_factory: Callable[..., Settings],
) -> Iterator[TestClient]:  # fmt: skip
    load_into_redis(redis_server.url, featured_dir / FEATURED, prefix)
    with TestClient(create_app(settings_factory(model_dir=featured_dir))) as c:
        yield c


class Direct:
    """The graph run once on one list, with the features given: what the service must give."""

    def __init__(self, folder: Path) -> None:
        self.session = ort.InferenceSession(str(folder / "model.onnx"),
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        vectors = np.load(folder / "item_vectors.npy").astype(np.float32)
        ids = (folder / "item_ids.txt").read_text().splitlines()
        self.vectors = dict(zip(ids, vectors, strict=True))

    def scores(self, history: list[str], cands: list[str], feats: np.ndarray) -> dict[str, float]:
        hist = np.stack([self.vectors[i] for i in history])[None]
        feed = {
            "hist": hist, "hist_mask": np.ones(hist.shape[:2], bool),
            "cand": np.stack([self.vectors[i] for i in cands])[None],
            "cand_mask": np.ones((1, len(cands)), bool),
            "cand_rank": np.arange(len(cands), dtype=np.float32)[None],
            "cand_feats": feats.astype(np.float32)[None],
        }  # fmt: skip
        (scores,) = self.session.run(["scores"], feed)
        return dict(zip(cands, scores[0].tolist(), strict=True))


def _scores(client: TestClient, body: dict[str, Any]) -> dict[str, float]:
    response = client.post("/rerank", json={"user_id": "u", "k": 100, **body})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_version"] == FEATURED and not answer["degraded"]
    return {i["item_id"]: i["score"] for i in answer["items"]}


def _unknown(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rerank_unknown_features_total "):
            return float(line.split()[1])
    raise AssertionError("rerank_unknown_features_total is not exported")


HISTORY = ["3", "9", "27"]


def test_features_reach_the_model_and_absent_ones_take_defaults(
    client: TestClient, featured_dir: Path
) -> None:
    direct = Direct(featured_dir / FEATURED)
    cands = ["5", "6", "7", "8"]
    body = {
        "history": HISTORY,
        "candidates": [
            {"id": "5", "features": {"ease_rank": 1, "ease_score": 2.5, "markov_rank": 3}},
            "6",  # a plain id: every feature at its default
            {"id": 7, "features": {"ease_rank": 2}},  # an integer id; two features absent
            {"id": "8"},  # an object without features
        ],
    }
    feats = np.stack([[1, 2.5, 3], DEFAULTS, [2, 0, 1000], DEFAULTS])
    expected = direct.scores(HISTORY, cands, feats)
    got = _scores(client, body)
    assert got.keys() == expected.keys()
    for item, score in expected.items():
        assert got[item] == pytest.approx(score, abs=1e-4)
    # The features matter: the same ids without them score as all-default rows.
    plain = _scores(client, {"history": HISTORY, "candidates": cands})
    assert plain["5"] != pytest.approx(got["5"], abs=1e-4)
    defaults = direct.scores(HISTORY, cands, np.tile(DEFAULTS, (4, 1)))
    for item, score in defaults.items():
        assert plain[item] == pytest.approx(score, abs=1e-4)


def test_unknown_names_are_ignored_and_counted(client: TestClient) -> None:
    before = _unknown(client)
    plain = _scores(client, {"history": HISTORY, "candidates": ["5", "6"]})
    body = {
        "history": HISTORY,
        "candidates": [
            {"id": "5", "features": {"als_rank": 4, "color": 1}},
            {"id": "6", "features": {"als_rank": 9}},
            {"id": "no-such-item", "features": {"als_rank": 1}},  # missing vector: counted too
        ],
    }
    got = _scores(client, body)
    for item in ("5", "6"):
        assert got[item] == pytest.approx(plain[item], abs=1e-5)
    assert _unknown(client) == before + 4


def test_objects_without_features_score_as_plain_ids(client: TestClient) -> None:
    plain = _scores(client, {"history": HISTORY, "candidates": ["5", "6"]})
    got = _scores(client, {"history": HISTORY, "candidates": [{"id": "5"}, {"id": "6"}]})
    assert got == pytest.approx(plain, abs=1e-5)


def test_duplicates_keep_the_first_and_its_features(client: TestClient) -> None:
    first = _scores(client, {"history": HISTORY, "candidates": [
        {"id": "5", "features": {"ease_rank": 1}}, "6"]})  # fmt: skip
    again = _scores(client, {"history": HISTORY, "candidates": [
        {"id": "5", "features": {"ease_rank": 1}}, "6", {"id": "5", "features": {"ease_rank": 900}},
        "6"]})  # fmt: skip
    assert again == pytest.approx(first, abs=1e-5)


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"id": "7", "features": {"ease_rank": "NaN"}}, "feature 'ease_rank' is not a number"),
        ({"id": "7", "features": {"ease_rank": True}}, "feature 'ease_rank' is not a number"),
        ({"id": "7", "features": {"ease_rank": None}}, "feature 'ease_rank' is not a number"),
        ({"id": "7", "features": {"ease_rank": [1]}}, "feature 'ease_rank' is not a number"),
        ({"id": "7", "features": {"ease_rank": 1e300}}, "feature 'ease_rank' is not a finite"),
        ({"id": "7", "features": [1, 2]}, "features must be an object"),
        ({"id": "7", "feature": {"ease_rank": 1}}, 'an object holds "id" and "features"'),
        ({"features": {"ease_rank": 1}}, 'an object holds "id" and "features"'),
    ],
)
def test_bad_features_are_422_naming_the_candidate(
    client: TestClient, candidate: dict[str, Any], message: str
) -> None:
    response = client.post("/rerank", json={"user_id": "u", "candidates": ["5", "6", candidate]})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any("candidate 2" in d["msg"] and message in d["msg"] for d in detail), detail


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_422(client: TestClient, value: str) -> None:
    body = '{"user_id": "u", "candidates": ["5", {"id": "7", "features": {"ease_rank": %s}}]}'
    response = client.post(
        "/rerank", content=body % value, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "candidate 1 (id '7'): feature 'ease_rank' is not a finite number" in response.text


def test_a_bad_id_inside_an_object_is_422_at_its_index(client: TestClient) -> None:
    response = client.post("/rerank", json={"user_id": "u", "candidates": ["5", {"id": ""}]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "candidates", 1]


def test_a_model_without_features_ignores_and_counts_them(
    redis_server: EmbeddedRedis, prefix: str, settings_factory: Callable[..., Settings]
) -> None:
    load_into_redis(redis_server.url, settings_factory().model_dir / VERSION_A, prefix)
    with TestClient(create_app(settings_factory())) as c:
        body = {"user_id": "u", "history": HISTORY, "k": 5}
        plain = c.post("/rerank", json={**body, "candidates": ["5", "6"]}).json()
        before = _unknown(c)
        mixed = c.post("/rerank", json={**body, "candidates": [
            {"id": "5", "features": {"ease_rank": 1, "ease_score": 3}}, "6"]}).json()  # fmt: skip
        assert mixed == plain
        assert _unknown(c) == before + 2


def test_cand_feats_padding_and_jobs_without_features(featured_dir: Path) -> None:
    """A batch mixes jobs with and without features and pads them; each job scores as alone."""
    folder = featured_dir / FEATURED
    manifest = verify_folder(folder)
    session = load_session(folder / "model.onnx", ["CPUExecutionProvider"], 1)
    model = LoadedModel(manifest, session, 64)
    assert model.has_cand_feats
    direct = Direct(folder)
    rng = np.random.default_rng(0)
    jobs, expected = [], []
    for n, with_feats in [(3, True), (9, False), (1, True)]:
        cands = [str(i) for i in rng.choice(np.arange(1, N_ITEMS + 1), n, replace=False)]
        feats = rng.uniform(1, 500, (n, 3)).astype(np.float32) if with_feats else None
        jobs.append(Job(np.stack([direct.vectors[i] for i in HISTORY]),
                        np.stack([direct.vectors[i] for i in cands]),
                        np.arange(n, dtype=np.float32), feats))  # fmt: skip
        rows = feats if feats is not None else np.tile(DEFAULTS, (n, 1))
        expected.append(list(direct.scores(HISTORY, cands, rows).values()))
    for got, want in zip(model.run_batch(jobs), expected, strict=True):
        np.testing.assert_allclose(got.scores, want, atol=1e-4)


def reference_rows(given: list[dict[str, float]], positions: list[int]) -> tuple[np.ndarray, int]:
    """``LoadedModel.features`` written a value at a time."""
    index = {f["name"]: j for j, f in enumerate(FEATURES)}
    rows = np.tile(DEFAULTS, (len(positions), 1))
    for row, p in enumerate(positions):
        for name, value in given[p].items():
            if name in index:
                rows[row, index[name]] = value
    unknown = sum(name not in index for named in given for name in named)
    return rows, unknown


@pytest.mark.parametrize(
    "case",
    [
        "same names",
        "same names, other orders",
        "mixed with plain ids",
        "partial names",
        "no features at all",
    ],
)
def test_feature_rows_match_a_value_at_a_time(featured_dir: Path, case: str) -> None:
    """The one-set-of-names path and the grouped path write what each candidate sent."""
    folder = featured_dir / FEATURED
    model = LoadedModel(verify_folder(folder), load_session(folder / "model.onnx", [
        "CPUExecutionProvider"], 1), 64)  # fmt: skip
    rng = np.random.default_rng(len(case))
    names = ["ease_rank", "extra", "markov_rank", "ease_score"]
    given: list[dict[str, float]] = []
    for i in range(20):
        order = list(rng.permutation(names)) if case != "same names" else names
        if case == "partial names":
            order = order[: 1 + i % 4]
        named = {name: float(rng.uniform(-5, 5)) for name in order}
        plain = case == "no features at all" or (case == "mixed with plain ids" and i % 3 == 0)
        given.append({} if plain else named)
    positions = [0, 2, 3, 7, 8, 19]  # the candidates that have a vector
    rows, unknown = model.features(given, np.array(positions))
    want_rows, want_unknown = reference_rows(given, positions)
    assert rows is not None
    np.testing.assert_allclose(rows, want_rows, rtol=1e-6)
    assert unknown == want_unknown


def test_graph_and_manifest_must_agree_on_features(featured_dir: Path, model_dir: Path) -> None:
    featured = verify_folder(featured_dir / FEATURED)
    plain = verify_folder(model_dir / VERSION_A)
    with_feats = load_session(featured_dir / FEATURED / "model.onnx", ["CPUExecutionProvider"], 1)
    without = load_session(model_dir / VERSION_A / "model.onnx", ["CPUExecutionProvider"], 1)
    with pytest.raises(ModelError, match="declares cand_feats and the manifest names 0"):
        LoadedModel(plain, with_feats, 64)
    with pytest.raises(ModelError, match="lacks cand_feats and the manifest names 3"):
        LoadedModel(featured, without, 64)
