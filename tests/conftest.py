"""Shared fixtures: two exported random models, a real redis-server, app factories.

Everything talks to a real redis-server started by the suite on a free port. Each test gets
its own key prefix, so tests share one server without seeing each other's keys; the tests
that stop or pause Redis start their own server.
"""

from __future__ import annotations

import shutil
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.embedded import EmbeddedRedis
from app.factory import create_app
from app.loader import load_into_redis
from contract import ENCODER_DIR
from tests.reference import Reference

if TYPE_CHECKING:
    from training.data import Dataset

ROOT = Path(__file__).resolve().parent.parent
VERSION_A = "test-a"
VERSION_B = "test-b"
ITEMS_A, ITEMS_B = "items-a", "items-b"  # the versions with item towers
DEMO_VERSION = "test-demo"
HISTORY_LEN = 8
N_ITEMS = 200


@pytest.fixture(autouse=True)
def _denormals_back() -> Iterator[None]:
    """Training flushes denormal floats process-wide (training/train.py), and hypothesis'
    float strategies refuse to run without them: every test gives them back."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/ with two versions of the same shape and different weights and vectors."""
    from training.export import export_random_model  # torch: only the fixtures need it

    root = tmp_path_factory.mktemp("models")
    # The exporter is the training side's: its torch deprecation notices are not ours to fix
    # (and the exporter's stacklevel attributes them to training/, past pyproject's filter).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for version, seed in ((VERSION_A, 0), (VERSION_B, 1)):
            export_random_model(
                root, N_ITEMS, dim=16, history_len=HISTORY_LEN, version=version, seed=seed
            )
    return root


@pytest.fixture(scope="session")
def demo_dataset() -> Dataset:
    """A generated data set (training.data.synthetic): item ids "1000".., titles
    "synthetic item 1000"..; the tests' stand-in for MovieLens, which is never committed."""
    from training.data import synthetic

    return synthetic(n_users=40, n_items=N_ITEMS, length=30, seed=0)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory, demo_dataset: Dataset) -> Path:
    """models/ with one random model over ``demo_dataset``'s item ids (the DEFAULT) and its
    demo page sample, demo.json, made by the generator from that data set."""
    from training.demo import make_sample
    from training.export import export_random_model

    root = tmp_path_factory.mktemp("demo-models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        export_random_model(
            root,
            N_ITEMS,
            dim=16,
            history_len=HISTORY_LEN,
            version=DEMO_VERSION,
            seed=2,
            item_ids=demo_dataset.item_ids,
        )
    (root / "DEFAULT").write_text(DEMO_VERSION + "\n")
    make_sample(demo_dataset, root / DEMO_VERSION)
    return root


@dataclass
class Towered:
    models: Path  # a models/ root: two versions with item towers, and the text encoder
    items_file: Path
    dataset: Dataset  # of the files


@pytest.fixture(scope="session")
def towered(tmp_path_factory: pytest.TempPathFactory) -> Towered:
    """Two small models of the fused pipeline (recall features, id dropout) trained on
    generated files (genres, year), each exported with its item tower, beside a link to the
    repository's text encoder."""
    from training.data import synthetic_tables
    from training.export import export_model
    from training.files import read_dataset, write_files
    from training.fusion import ChannelParams
    from training.pipeline import PipelineConfig, fit, item_tower, prepare
    from training.sasrec import SASRecConfig
    from training.train import TrainConfig

    sasrec = SASRecConfig(history_len=8, dim=8, n_layers=1, n_heads=1, max_epochs=2, threads=1)

    root = tmp_path_factory.mktemp("towered")
    inter, items = write_files(root / "data", *synthetic_tables(60, 40, 10, seed=0))
    dataset = read_dataset(inter, items, name="syn", say=None)
    models = root / "models"
    models.mkdir()
    (models / ENCODER_DIR).symlink_to(ROOT / "models" / ENCODER_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for version, seed in ((ITEMS_A, 0), (ITEMS_B, 1)):
            # The fused pipeline's model: recall features (cand_feats) and an item tower.
            cfg = PipelineConfig(
                n_candidates=20, history_len=8, dim=16, n_layers=1, hidden=32,
                als_factors=8, id_dropout=0.3, seed=seed, channel_depth=40, fused_holdout=3,
                lists_per_user=5, channel_params=ChannelParams(sasrec=sasrec),
                train=TrainConfig(epochs=1, batch_size=64, average_last=0, seed=seed),
            )  # fmt: skip
            prep = prepare(dataset, cfg)
            model, _ = fit(prep, cfg)
            tower = item_tower(model, cfg, dataset)
            assert tower is not None and prep.candidate_features
            folder = export_model(model, dataset.item_ids, models, version, {}, tower,
                                  candidate_features=prep.candidate_features)  # fmt: skip
            # The exported cold path is the tower's own, to float precision.
            import onnxruntime as ort

            session = ort.InferenceSession(str(folder / tower.file))
            attrs = np.concatenate([dataset.categorical, dataset.numeric], axis=1)
            (onnx,) = session.run(None, {"text_vec": prep.text[1:], "attrs": attrs})
            np.testing.assert_allclose(onnx, model.tower.cold_vectors().numpy(), atol=1e-4)
    return Towered(models, items, dataset)


def synthetic_split(
    n_users: int, n_items: int, length: int, seed: int
) -> tuple[Any, Any, list[Any]]:
    """A generated data set, its leave-last-out split, and each user's test history (the
    channel tests' data)."""
    from training.data import synthetic
    from training.split import leave_last_out

    ds = synthetic(n_users=n_users, n_items=n_items, length=length, seed=seed)
    split = leave_last_out(ds.sequences, ds.times)
    return ds, split, [split.test_history(u) for u in range(len(ds.users))]


@pytest.fixture(scope="session")
def references(model_dir: Path) -> dict[str, Reference]:
    return {v: Reference(model_dir / v) for v in (VERSION_A, VERSION_B)}


def broken_copy(model_dir: Path, tmp_path: Path, broken: str) -> Path:
    """A models/ folder whose ``broken`` version has a corrupted model.onnx."""
    root = tmp_path / "models"
    for version in (VERSION_A, VERSION_B):
        shutil.copytree(model_dir / version, root / version)
    with (root / broken / "model.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    return root


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def make_settings(redis_url: str, prefix: str, model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "key_prefix": prefix,
        "model_dir": model_dir,
        "max_candidates": 64,  # fewer shape buckets: faster warm-up
        "max_batch": 8,
        "onnx_threads": 1,
        "version_poll_s": 0.1,
        # Above the service default (50 ms): a busy CI machine can stall a healthy Redis
        # call past 50 ms, which would turn a correctness test into a degraded answer. The
        # fault tests still bound every degraded answer well below a second.
        "redis_timeout_ms": 250,
        "max_history": 100,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The URL the service under test and the loader use (test_cluster.py: its cluster's)."""
    return redis_server.url


@pytest.fixture
def settings_factory(redis_url: str, prefix: str, model_dir: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        folder = overrides.pop("model_dir", model_dir)
        return make_settings(redis_url, prefix, folder, **overrides)

    return build


@pytest.fixture
def loaded(redis_url: str, prefix: str, model_dir: Path) -> str:
    """Version A loaded into Redis under this test's prefix and active."""
    load_into_redis(redis_url, model_dir / VERSION_A, prefix)
    return VERSION_A


@pytest.fixture
def app(loaded: str, settings_factory: Callable[..., Settings]) -> FastAPI:
    return create_app(settings_factory())


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan plus an async client on one event loop: for concurrent traffic."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone, which it may stop, pause and restart."""
    with EmbeddedRedis() as server:
        yield server
