"""The offline pipeline end to end: split, recall, lists, features, train, evaluate, export.

``prepare`` builds everything the model and the baselines read; ``fit`` trains the model;
``run`` does all of it and writes ``models/<version>/`` with its report.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch

from contract import ItemTowerSpec
from training.data import Dataset
from training.export import export_model, tower_spec
from training.features import item_features
from training.lists import Lists, eval_lists, training_lists
from training.model import ItemTower, ModelConfig, Reranker
from training.progress import step
from training.recall import ALSRecall, ItemKNN, recall_at
from training.split import Split, leave_last_out
from training.train import TrainConfig, predict, train


@dataclass
class PipelineConfig:
    n_candidates: int = 100  # N, the recall list length
    history_len: int = 50  # L
    dim: int = 64  # D
    n_layers: int = 2
    n_heads: int = 2
    hidden: int = 64
    dropout: float = 0.2
    use_text: bool = True  # MiniLM over item text; synthetic data uses random text vectors
    als_factors: int = 64
    lists_per_user: int = 120  # training lists from each user's most recent positions
    min_history: int = 3  # the shortest history a training list is made from
    list_context: bool = True  # see ModelConfig
    # See ModelConfig.id_dropout. With text vectors (use_text), the model is exported with
    # its item tower, so that it can add items after training (POST /items).
    id_dropout: float = 0.1
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Prepared:
    dataset: Dataset
    split: Split
    knn: ItemKNN
    train_lists: Lists
    val_lists: Lists  # item-kNN lists for the validation item: early stopping, tuning
    test_lists: dict[str, Lists]  # per recall source, one list per user for the test item
    text: np.ndarray  # (I+1, text_dim)
    cf: np.ndarray  # (I+1, n_cf)
    stats: np.ndarray  # (I+1, n_stats)
    recall: dict[str, dict[str, float]]  # Recall@N per source and split


def _text_vectors(dataset: Dataset, cfg: PipelineConfig, cache_dir: Path | None) -> np.ndarray:
    if cfg.use_text:
        from training.text import encode

        vectors = encode(dataset.texts, cache_dir)
    else:  # synthetic items have no meaningful text; a fixed random vector stands in
        vectors = np.random.default_rng(cfg.seed).normal(size=(dataset.n_items, 384))
    return np.concatenate([np.zeros((1, vectors.shape[1])), vectors]).astype(np.float32)


def prepare(dataset: Dataset, cfg: PipelineConfig, cache_dir: Path | None = None) -> Prepared:
    split = leave_last_out(dataset.sequences, dataset.times)
    n_users, n = len(dataset.users), cfg.n_candidates
    val_hist = [split.val_history(u) for u in range(n_users)]
    test_hist = [split.test_history(u) for u in range(n_users)]
    with step("item-knn"):
        knn = ItemKNN(split.train, dataset.n_items)
    with step("als"):
        als = ALSRecall(split.train, dataset.n_items, factors=cfg.als_factors, seed=cfg.seed)
    recall: dict[str, dict[str, float]] = {}
    test_lists: dict[str, Lists] = {}
    val_lists = None
    for source in (knn, als):
        with step(f"{source.name} recall lists"):
            val_cand, _ = source.recall(val_hist, n)
            test_cand, _ = source.recall(test_hist, n)
        recall[source.name] = {
            f"val_recall@{n}": recall_at(val_cand, split.val),
            f"test_recall@{n}": recall_at(test_cand, split.test),
        }
        test_lists[source.name] = eval_lists(test_hist, split.test, test_cand, cfg.history_len)
        if source is knn:
            val_lists = eval_lists(val_hist, split.val, val_cand, cfg.history_len)
    assert val_lists is not None
    with step("item features"):
        cf, stats = item_features(
            split.train, split.train_times, dataset.numeric, knn, dataset.n_items
        )
    with step("training lists"):
        train_lists = training_lists(
            split.train,
            knn,
            n,
            cfg.history_len,
            min_history=cfg.min_history,
            max_per_user=cfg.lists_per_user,
        )
    with step("text vectors"):
        text = _text_vectors(dataset, cfg, cache_dir)
    return Prepared(
        dataset=dataset,
        split=split,
        knn=knn,
        train_lists=train_lists,
        val_lists=val_lists,
        test_lists=test_lists,
        text=text,
        cf=cf,
        stats=stats,
        recall=recall,
    )


def build_model(prep: Prepared, cfg: PipelineConfig) -> Reranker:
    mcfg = ModelConfig(
        n_items=prep.dataset.n_items + 1,
        dim=cfg.dim,
        history_len=cfg.history_len,
        text_dim=prep.text.shape[1],
        n_attrs=prep.dataset.categorical.shape[1],
        n_cf=prep.cf.shape[1],
        n_stats=prep.stats.shape[1],
        n_numeric=prep.dataset.numeric.shape[1],
        id_dropout=cfg.id_dropout,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        hidden=cfg.hidden,
        dropout=cfg.dropout,
        list_context=cfg.list_context,
    )
    torch.manual_seed(cfg.seed)
    attrs = prep.dataset.categorical
    attrs = np.concatenate([np.zeros((1, attrs.shape[1]), np.float32), attrs])  # row 0: padding
    tower = ItemTower(
        mcfg,
        torch.from_numpy(prep.text),
        torch.from_numpy(attrs.astype(np.float32)),
        torch.from_numpy(prep.cf),
        torch.from_numpy(prep.stats),
    )
    return Reranker(mcfg, tower)


def item_tower(model: Reranker, cfg: PipelineConfig, dataset: Dataset) -> ItemTowerSpec | None:
    """The item tower section to export: only when the text vectors are the text encoder's
    (a new item's are; synthetic stand-ins are not) and the tower learned a cold path."""
    if not cfg.use_text or cfg.id_dropout <= 0:
        return None
    from training.text import encoder_sha256

    return tower_spec(dataset, model.cfg, encoder_sha256())


def fit(prep: Prepared, cfg: PipelineConfig) -> tuple[Reranker, list[dict[str, float]]]:
    model = build_model(prep, cfg)
    return train(model, prep.train_lists, prep.val_lists, cfg.train)


def run(
    dataset: Dataset,
    models_dir: Path,
    cfg: PipelineConfig,
    cache_dir: Path | None = None,
    version: str | None = None,
) -> Path:
    """Everything: returns the exported model folder, with report.json/.md/.png inside."""
    from training.evaluate import evaluate, write_report

    started = time.monotonic()
    prep = prepare(dataset, cfg, cache_dir)
    print(f"prepared {len(prep.train_lists)} training lists; recall {json.dumps(prep.recall)}")
    with step("train"):
        model, log = fit(prep, cfg)
    with step("evaluate"):
        report = evaluate(prep, partial(predict, model), cfg)
    report["recall"] = prep.recall
    report["train_log"] = log
    report["minutes"] = (time.monotonic() - started) / 60
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    version = version or f"{dataset.name}-{stamp}"
    extra = {
        "dataset": dataset.name,
        "training": cfg.to_dict(),
        "offline_metrics": report["summary"],
    }
    if dataset.source:  # the files it was trained on: `rerank eval` reads them again
        extra["data"] = dataset.source
    folder = export_model(
        model, dataset.item_ids, models_dir, version, extra, item_tower(model, cfg, dataset)
    )
    try:
        write_report(report, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no model folder without its report
        raise
    return folder
