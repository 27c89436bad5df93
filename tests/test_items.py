"""Items after training: POST /items, `rerank items add`, the item tower section.

A small model is trained for a few steps on synthetic files with id dropout, through the real
text encoder (app/encoder.py over models/encoder/), and exported with its item tower; the
tests add items to it through the service and the command, and hold the vectors to the
offline cold vectors of training/cold.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.errors import ItemsBusy
from app.factory import create_app
from app.items import WORKER_NICE, EncoderQueue
from app.loader import load_into_redis
from contract import Manifest, ManifestError, read_manifest
from tests.conftest import ITEMS_A, ITEMS_B, VERSION_A, Towered, make_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings(redis_server: EmbeddedRedis, prefix: str, towered: Towered) -> Settings:
    load_into_redis(redis_server.url, towered.models / ITEMS_A, prefix)
    load_into_redis(redis_server.url, towered.models / ITEMS_B, prefix, activate=False)
    return make_settings(redis_server.url, prefix, towered.models)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def store(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def vector(store: redis.Redis, prefix: str, version: str, item_id: str) -> np.ndarray | None:
    raw = store.get(f"{prefix}:v:{version}:{item_id}")
    return None if raw is None else np.frombuffer(raw, dtype="<f2").astype(np.float32)


SCI_FI = {"item_id": "new-1", "text": "Space Station 2049 (1998)",
          "attributes": {"genres": ["Sci-Fi"], "year": 1998}}  # fmt: skip


def test_items_adds_a_vector_that_rerank_then_scores(
    client: TestClient, store: redis.Redis, prefix: str
) -> None:
    before = client.post("/rerank", json={"user_id": "1", "candidates": ["1000", "new-1"]})
    assert before.json()["missing"] == ["new-1"]
    answer = client.post("/items", json={"items": [SCI_FI]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "added": ["new-1"], "existing": [], "versions": [ITEMS_A], "ignored_attributes": [],
    }  # fmt: skip
    got = vector(store, prefix, ITEMS_A, "new-1")
    assert got is not None and got.shape == (16,) and np.isfinite(got).all()
    after = client.post("/rerank", json={"user_id": "1", "candidates": ["1000", "new-1"]})
    assert after.json()["missing"] == [] and after.json()["degraded"] is False
    metrics = client.get("/metrics").text
    assert "rerank_items_added_total 1.0" in metrics
    assert "rerank_item_encoder_seconds_count 1.0" in metrics


def test_one_model_reads_recall_features_and_adds_items(
    client: TestClient, towered: Towered
) -> None:
    from contract import CAND_FEATS

    manifest = read_manifest(towered.models / ITEMS_A)
    assert manifest.tower is not None and manifest.feature_names
    assert manifest.inputs is not None and CAND_FEATS in manifest.inputs
    assert client.post("/items", json={"items": [SCI_FI]}).status_code == 200
    # A new item has no recall features: it goes as a plain id beside candidates with them.
    name = manifest.feature_names[0]
    scores = []
    for value in (1.0, 500.0):
        body = {"user_id": "1", "candidates": [{"id": "1000", "features": {name: value}}, "new-1"]}
        answer = client.post("/rerank", json=body)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["missing"] == [] and got["degraded"] is False
        scores.append({i["item_id"]: i["score"] for i in got["items"]})
    assert scores[0]["1000"] != scores[1]["1000"], "the features reach the model"


def test_an_existing_vector_is_never_replaced(
    client: TestClient, store: redis.Redis, prefix: str
) -> None:
    assert client.post("/items", json={"items": [SCI_FI]}).json()["added"] == ["new-1"]
    first = vector(store, prefix, ITEMS_A, "new-1")
    catalogue_item = vector(store, prefix, ITEMS_A, "1000")
    other = {**SCI_FI, "text": "Something else entirely", "attributes": {"year": 1930}}
    answer = client.post("/items", json={"items": [other, {"item_id": 1000, "text": "x"}]})
    assert answer.json()["added"] == [] and answer.json()["existing"] == ["new-1", "1000"]
    np.testing.assert_array_equal(vector(store, prefix, ITEMS_A, "new-1"), first)
    np.testing.assert_array_equal(vector(store, prefix, ITEMS_A, "1000"), catalogue_item)


def test_vectors_go_under_every_live_version(
    client: TestClient, store: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def both(_: Any) -> list[str]:
        return [ITEMS_A, ITEMS_B]

    monkeypatch.setattr("app.items.live_versions", both)
    answer = client.post("/items", json={"items": [SCI_FI]}).json()
    assert answer["versions"] == [ITEMS_A, ITEMS_B] and answer["added"] == ["new-1"]
    a, b = (vector(store, prefix, v, "new-1") for v in (ITEMS_A, ITEMS_B))
    assert a is not None and b is not None and not np.allclose(a, b)  # each version's tower
    # Present under one version only: written where it is missing, kept where it is not.
    store.delete(f"{prefix}:v:{ITEMS_B}:new-1")
    again = client.post("/items", json={"items": [{**SCI_FI, "text": "changed"}]}).json()
    assert again["added"] == ["new-1"]
    np.testing.assert_array_equal(vector(store, prefix, ITEMS_A, "new-1"), a)
    rewritten = vector(store, prefix, ITEMS_B, "new-1")
    assert rewritten is not None and not np.allclose(rewritten, b)  # from the new text


def test_a_bad_item_is_a_422_naming_it(client: TestClient, store: redis.Redis, prefix: str) -> None:
    good = {"item_id": "ok-1", "text": "fine"}
    cases = {
        "year": {"item_id": "bad-1", "attributes": {"year": "1998"}},
        "genres": {"item_id": "bad-2", "attributes": {"genres": 7}},
    }
    for name, bad in cases.items():
        response = client.post("/items", json={"items": [good, bad]})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "items", 1, "attributes", name]
        assert bad["item_id"] in error["msg"] and name in error["msg"]
    twice = client.post("/items", json={"items": [good, good]})
    assert twice.status_code == 422 and "ok-1" in twice.json()["detail"][0]["msg"]
    for raw in (b'{"items": [{"item_id": "n", "attributes": {"year": NaN}}]}',
                b'{"items": [{"item_id": "n", "attributes": {"year": 1e400}}]}',
                b'{"items": [{"item_id": "n", "attributes": {"year": Infinity}}]}'):  # fmt: skip
        response = client.post("/items", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422, raw
        assert response.json()["detail"][0]["loc"][:3] == ["body", "items", 0]
    assert client.post("/items", json={"items": []}).status_code == 422
    too_many = [{"item_id": f"m{i}"} for i in range(101)]
    assert client.post("/items", json={"items": too_many}).status_code == 422
    assert store.keys(f"{prefix}:v:{ITEMS_A}:ok-1") == []  # a refused call writes nothing


def test_unknown_attributes_are_ignored_and_named(client: TestClient) -> None:
    item = {**SCI_FI, "attributes": {**SCI_FI["attributes"], "director": "Nobody"}}  # type: ignore[dict-item]
    answer = client.post("/items", json={"items": [item]})
    assert answer.status_code == 200
    assert answer.json()["ignored_attributes"] == ["director"]
    assert "rerank_item_attributes_ignored_total 1.0" in client.get("/metrics").text


def test_a_hundred_items_in_one_call(client: TestClient, store: redis.Redis, prefix: str) -> None:
    items = [{"item_id": f"bulk-{i}", "text": f"Film number {i}", "attributes": {"year": 1950 + i}}
             for i in range(100)]  # fmt: skip
    answer = client.post("/items", json={"items": items})
    assert answer.status_code == 200 and len(answer.json()["added"]) == 100
    assert len(store.keys(f"{prefix}:v:{ITEMS_A}:bulk-*")) == 100


def test_items_parity_with_the_offline_cold_vectors(
    client: TestClient, store: redis.Redis, prefix: str, towered: Towered
) -> None:
    """Each catalogue item, sent with its raw text and attributes under a new id, gets its
    offline cold vector (stored as the manifest's float16) to 1e-3."""
    from training.cold import offline_cold_vectors
    from training.files import read_items

    catalogue = read_items(towered.items_file)
    items = []
    for row, item_id in enumerate(catalogue.item_ids):
        attributes: dict[str, Any] = {}
        for a in catalogue.attributes:
            value = a.values[row]
            attributes[a.name] = (float(value) if np.isfinite(value) else None
                                  ) if a.kind == "numeric" else value  # fmt: skip
        items.append({"item_id": f"copy-{item_id}", "text": catalogue.texts[row],
                      "attributes": attributes})  # fmt: skip
    answer = client.post("/items", json={"items": items})
    assert answer.status_code == 200 and len(answer.json()["added"]) == len(items)
    offline = offline_cold_vectors(towered.models / ITEMS_A, towered.dataset)
    served = np.stack([vector(store, prefix, ITEMS_A, f"copy-{i}") for i in catalogue.item_ids])
    np.testing.assert_allclose(served, offline.astype(np.float16).astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(served, offline, atol=2e-3)  # float16's own rounding


def test_a_model_without_an_item_tower_answers_409(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    with TestClient(create_app(settings_factory())) as client:
        response = client.post("/items", json={"items": [SCI_FI]})
        assert response.status_code == 409
        assert VERSION_A in response.json()["detail"] and "item tower" in response.json()["detail"]
        # Nothing of the item encoder was loaded for a model without a tower.
        assert client.app.state.items.encoder._text is None  # type: ignore[attr-defined]


def test_the_encoder_loads_at_start_when_the_active_model_has_a_tower(client: TestClient) -> None:
    encoder = client.app.state.items.encoder  # type: ignore[attr-defined]
    assert encoder._text is not None and ITEMS_A in encoder._towers


def test_items_needs_the_api_key(settings: Settings) -> None:
    key = "k" * 16
    keyed = make_settings(
        settings.redis_url or "", settings.key_prefix, settings.model_dir, api_keys=key
    )
    with TestClient(create_app(keyed)) as client:
        assert client.post("/items", json={"items": [SCI_FI]}).status_code == 401
        ok = client.post("/items", json={"items": [SCI_FI]}, headers={"X-API-Key": key})
        assert ok.status_code == 200


def test_a_full_encoder_queue_is_the_overload_503(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def full(*_: Any) -> Any:
        raise ItemsBusy("full")

    monkeypatch.setattr(client.app.state.items.queue, "run", full)  # type: ignore[attr-defined]
    response = client.post("/items", json={"items": [SCI_FI]})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "overloaded: retry later"}
    assert "rerank_shed_total 1.0" in client.get("/metrics").text


def test_the_encoder_queue_is_bounded() -> None:
    import asyncio

    async def main() -> None:
        queue = EncoderQueue(max_waiting=1)
        release = threading.Event()
        try:
            running = asyncio.ensure_future(queue.run(release.wait, 10))
            waiting = asyncio.ensure_future(queue.run(lambda: 42))
            await asyncio.sleep(0.05)
            assert queue.pending == 2
            with pytest.raises(ItemsBusy):
                await queue.run(lambda: 0)
            release.set()
            assert await running is True and await waiting == 42
            assert queue.pending == 0
        finally:
            release.set()
            queue.close()

    asyncio.run(main())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread policies are Linux's")
def test_the_encoder_thread_runs_under_sched_idle() -> None:
    before = thread_priority()
    worker = in_encoder_thread(thread_priority)
    if sched_idle_allowed():
        assert worker[0] == os.SCHED_IDLE
    else:  # a kernel or sandbox that refuses the policy: the fallback
        assert worker == (os.SCHED_OTHER, WORKER_NICE)
    assert thread_priority() == before  # the caller's thread keeps its policy and nice value


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_the_encoder_thread_takes_nice_19_where_sched_idle_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError("refused")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert in_encoder_thread(thread_priority) == (os.SCHED_OTHER, WORKER_NICE)


def thread_priority() -> tuple[int, int]:
    """The calling thread's scheduling policy and nice value."""
    tid = threading.get_native_id()
    return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)


def in_encoder_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` run by a fresh encoder queue's worker thread."""
    import asyncio

    async def main() -> Any:
        queue = EncoderQueue(max_waiting=1)
        try:
            return await queue.run(fn)
        finally:
            queue.close()

    return asyncio.run(main())


def sched_idle_allowed() -> bool:
    """Whether this machine lets a thread take SCHED_IDLE (tried on a throwaway thread)."""
    allowed: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
            allowed.append(True)
        except OSError:
            allowed.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return allowed[0]


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rerank items add` reads this test's Redis, key prefix and models from the environment."""
    monkeypatch.setenv("RERANK_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("RERANK_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("RERANK_MODEL_DIR", str(settings.model_dir))


@pytest.mark.usefixtures("cli_env")
def test_rerank_items_add_writes_a_file_in_bulk(
    settings: Settings,
    store: redis.Redis,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from training import cli

    path = tmp_path / "new.csv"
    rows = [f"n{i},Film {i},Drama|Sci-Fi,{1990 + i}" for i in range(7)]
    path.write_text("item_id,text,genres,year,colour\n" + "\n".join(r + ",red" for r in rows))
    assert cli.main(["items", "add", str(path), "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "7 added, 0 existing" in out and "colour" in out
    assert len(store.keys(f"{prefix}:v:{ITEMS_A}:n*")) == 7
    assert cli.main(["items", "add", str(path)]) == 0
    assert "0 added, 7 existing" in capsys.readouterr().out
    # The same item through /items and through the command: the same vector.
    with TestClient(create_app(settings)) as client:
        body = {"item_id": "via-http", "text": "Film 3",
                "attributes": {"genres": "Drama|Sci-Fi", "year": 1993}}  # fmt: skip
        assert client.post("/items", json={"items": [body]}).status_code == 200
    np.testing.assert_array_equal(
        vector(store, prefix, ITEMS_A, "via-http"), vector(store, prefix, ITEMS_A, "n3")
    )


@pytest.mark.usefixtures("cli_env")
def test_rerank_items_add_refuses_a_bad_file_with_exit_2(
    store: redis.Redis, prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training import cli

    no_text = tmp_path / "no_text.csv"
    no_text.write_text("item_id,title\nb1,Film\n")
    assert cli.main(["items", "add", str(no_text)]) == 2
    assert "column text is missing" in capsys.readouterr().err
    assert cli.main(["items", "add", str(tmp_path / "absent.csv")]) == 2
    # A year that is not a number: the model reads year as numeric; nothing is written.
    bad_year = tmp_path / "bad_year.csv"
    bad_year.write_text("item_id,text,year\nb2,Film,1999\nb3,Film,unknown\n")
    assert cli.main(["items", "add", str(bad_year)]) == 2
    assert "year" in capsys.readouterr().err
    assert store.keys(f"{prefix}:v:*:b*") == []


def test_the_service_process_never_imports_torch(settings: Settings) -> None:
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fastapi.testclient import TestClient\n"
        "from app.config import Settings\n"
        "from app.factory import create_app\n"
        f"s = Settings(_env_file=None, redis_url={settings.redis_url!r}, "
        f"key_prefix={settings.key_prefix!r}, model_dir=Path({str(settings.model_dir)!r}), "
        "max_candidates=64, max_batch=8)\n"
        "with TestClient(create_app(s)) as c:\n"
        "    r = c.post('/items', json={'items': [{'item_id': 'p1', 'text': 'Probe'}]})\n"
        "    assert r.status_code == 200, r.text\n"
        "heavy = sorted({'torch', 'transformers', 'sentence_transformers', 'training'}"
        " & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_manifest_section_is_checked(towered: Towered) -> None:
    manifest = read_manifest(towered.models / ITEMS_A)
    tower = manifest.tower
    assert tower is not None and tower.width == manifest.model_config["n_attrs"] + 1  # type: ignore[index]
    data = manifest.to_dict()
    assert Manifest.from_dict(json.loads(json.dumps(data)), "copy") == manifest
    old = {k: v for k, v in data.items() if k != "item_tower"}
    assert Manifest.from_dict(old, "old").tower is None  # a manifest without one stays valid
    broken = [
        ({**data["item_tower"], "numeric": [{"name": "year", "median": 1, "mean": 0, "std": 0}]},
         "std"),
        ({**data["item_tower"], "file": "other.onnx"}, "other.onnx"),
        ({**data["item_tower"], "dim": 3}, "dim"),
        ({**data["item_tower"], "categorical": [{"name": "g", "values": ["a", "a"]}]}, "repeat"),
        ("not an object", "object"),
    ]  # fmt: skip
    for section, words in broken:
        with pytest.raises(ManifestError, match=words):
            Manifest.from_dict({**data, "item_tower": section}, "m")


def test_the_pipeline_exports_recall_features_and_an_item_tower(
    towered: Towered, tmp_path: Path
) -> None:
    """``rerank train``'s pipeline end to end: one folder with cand_feats, its
    candidate_features, item_tower.onnx under sha256, and the recall channels beside them;
    id dropout and feature dropout both in the model's config."""
    from contract import CAND_FEATS, verify_folder
    from training.fusion import ChannelParams
    from training.pipeline import PipelineConfig, run
    from training.sasrec import SASRecConfig
    from training.train import TrainConfig

    sasrec = SASRecConfig(history_len=8, dim=8, n_layers=1, n_heads=1, max_epochs=2, threads=1)
    cfg = PipelineConfig(
        n_candidates=20, history_len=8, dim=16, n_layers=1, hidden=32, als_factors=8,
        channel_depth=40, fused_holdout=3, lists_per_user=5,
        channel_params=ChannelParams(sasrec=sasrec),
        train=TrainConfig(epochs=1, batch_size=64, average_last=0),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        folder = run(towered.dataset, tmp_path, cfg, version="both")
    manifest = verify_folder(folder)
    assert manifest.inputs is not None and CAND_FEATS in manifest.inputs
    assert len(manifest.feature_names) == 10
    assert manifest.tower is not None and manifest.tower.file in manifest.sha256
    assert (folder / "recall" / "channels.json").is_file()
    config = manifest.model_config or {}
    assert config["id_dropout"] == cfg.id_dropout > 0 and config["feat_dropout"] == 0.3
