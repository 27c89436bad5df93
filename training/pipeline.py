"""The offline pipeline end to end: split, recall, lists, features, train, evaluate, export.

``prepare`` builds everything the model and the baselines read; ``fit`` trains the model;
``run`` does all of it and writes ``models/<version>/`` with its report.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract import ItemTowerSpec
from training.channels import Channel
from training.data import Dataset
from training.export import export_model, tower_spec
from training.features import item_features
from training.fusion import (
    FUSED_CHANNELS,
    RRF,
    ChannelParams,
    Fused,
    candidate_features,
    fit_channels,
    positions,
    run_channels,
    time_cut,
    tune_rrf,
)
from training.lists import Lists, eval_lists, right_align, training_lists
from training.model import ItemTower, ModelConfig, Reranker
from training.progress import step
from training.recall import ALSRecall, ItemKNN, recall_at
from training.sasrec import SASRecConfig, SASRecRecall
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
    # Recall (training/fusion.py): the channels that vote in the fused list, and those
    # that only give their rank and score as features of the fused candidates.
    channels: tuple[str, ...] = FUSED_CHANNELS
    feature_channels: tuple[str, ...] = ("item-knn", "als")
    channel_depth: int = 200  # each channel's list length fed to the fusion
    tune_fusion: bool = True  # RRF weights and k on validation; else channel_params'
    channel_params: ChannelParams = field(default_factory=ChannelParams)
    # Fused training lists: each user's last `fused_holdout` training positions, answered
    # by channels fitted without them (fusion.time_cut).
    fused_holdout: int = 20
    # At most this many fused training queries, and item-kNN training lists' positions:
    # past it, users drawn at random (seeded) until their queries reach it. Each query runs
    # every channel, and each list is a step of the reranker's epochs: at 50,000 of each,
    # eight epochs fit in the scale run's --max-minutes 30. MovieLens-100K's 18,472 and
    # 25,887 are under it.
    max_fused_queries: int = 50_000
    max_knn_queries: int = 50_000
    # Validation and test lists (tuning, early stopping, the report) for at most this many
    # users: a seeded sample past it, said in the report. MovieLens-100K's 943 are all in.
    max_eval_users: int = 20_000
    # Past `large_data` training interactions, each of SASRec's two fits stops at
    # `large_sasrec_minutes`, so that the channels, the lists and the evaluation fit beside
    # the reranker's max_minutes (docs/data.md, "At scale"); MovieLens-100K has 98,114.
    large_data: int = 300_000
    large_sasrec_minutes: float = 2.0
    # Item-kNN training lists of plain ids (features at their defaults), from each user's
    # most recent positions, so that requests without features still rank well (0: none).
    lists_per_user: int = 30
    min_history: int = 3  # the shortest history a training list is made from
    feat_dropout: float = 0.3  # share of fused training lists trained without features
    cand_feat_dropout: float = 0.1  # share of the other lists' candidates without them
    list_context: bool = True  # see ModelConfig
    # See ModelConfig.id_dropout. With text vectors (use_text), the model is exported with
    # its item tower, so that it can add items after training (POST /items).
    id_dropout: float = 0.1
    cold_without_features: bool = True  # see ModelConfig
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        """From a manifest's ``training``; keys of older pipelines are left out."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "feature_channels"):
            if key in known:
                known[key] = tuple(known[key])
        if "channel_params" in known:
            cp = dict(known["channel_params"])
            cp["sasrec"] = SASRecConfig(**cp.get("sasrec", {}))
            known["channel_params"] = ChannelParams(**cp)
        if "train" in known:
            known["train"] = TrainConfig(**known["train"])
        return cls(**known)

    @property
    def all_channels(self) -> list[str]:
        return [*self.channels, *(c for c in self.feature_channels if c not in self.channels)]


@dataclass
class Prepared:
    dataset: Dataset
    split: Split
    knn: ItemKNN
    train_lists: Lists  # fused lists with features, then item-kNN lists at the defaults
    val_lists: Lists  # fused lists for the validation item: early stopping, tuning
    test_lists: dict[str, Lists]  # "fused" (with features), "item-knn" (plain ids)
    text: np.ndarray  # (I+1, text_dim)
    cf: np.ndarray  # (I+1, n_cf)
    stats: np.ndarray  # (I+1, n_stats)
    recall: dict[str, dict[str, float]]  # Recall@N per list source and split
    candidate_features: list[dict[str, Any]] = field(default_factory=list)  # the manifest's
    fusion: RRF | None = None
    channel_orders: dict[str, Lists] = field(default_factory=dict)  # each channel's top N
    sasrec: SASRecRecall | None = None  # fitted on the training split: saved with the model
    minutes: dict[str, float] = field(default_factory=dict)  # wall minutes per step
    fused_train_lists: int = 0  # the first this many of ``train_lists`` are the fused ones

    @property
    def feature_defaults(self) -> np.ndarray:
        return np.array([f["default"] for f in self.candidate_features], np.float32)


@contextmanager
def _timed(name: str, minutes: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    with step(name):
        yield
    minutes[name] = round((time.monotonic() - started) / 60, 3)


def _text_vectors(dataset: Dataset, cfg: PipelineConfig, cache_dir: Path | None) -> np.ndarray:
    if cfg.use_text:
        from training.text import encode

        vectors = encode(dataset.texts, cache_dir)
    else:  # synthetic items have no meaningful text; a fixed random vector stands in
        vectors = np.random.default_rng(cfg.seed).normal(size=(dataset.n_items, 384))
    return np.concatenate([np.zeros((1, vectors.shape[1])), vectors]).astype(np.float32)


def _fit_channels(
    cfg: PipelineConfig,
    train: list[np.ndarray],
    n_items: int,
    val: np.ndarray,
    label: str,
    minutes: dict[str, float],
    knn: ItemKNN | None = None,
) -> list[Channel]:
    """``cfg.all_channels`` fitted on ``train``, each timed; ``knn`` is used where given."""
    sasrec = replace(cfg.channel_params.sasrec, seed=cfg.seed)
    if sum(len(seq) for seq in train) > cfg.large_data:
        sasrec = replace(sasrec, max_minutes=min(sasrec.max_minutes, cfg.large_sasrec_minutes))
    params = replace(cfg.channel_params, sasrec=sasrec)
    out: list[Channel] = []
    for name in cfg.all_channels:
        with _timed(f"{label} {name}", minutes):
            if name == "item-knn" and knn is not None:
                out.append(knn)
            elif name == "als":
                out.append(ALSRecall(train, n_items, factors=cfg.als_factors, seed=cfg.seed))
            else:
                out += fit_channels(train, n_items, val, params, [name])
    return out


def capped_users(counts: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """The users (sorted indices) whose queries (``counts``, per user) are kept: all with
    any when their sum fits ``cap``; else whole users in a seeded random order while the
    running sum fits."""
    users = np.flatnonzero(counts > 0)
    if counts.sum() <= cap:
        return users
    order = np.random.default_rng(seed).permutation(users)
    return np.sort(order[np.cumsum(counts[order]) <= cap])


def eval_users(n_users: int, limit: int, seed: int) -> np.ndarray:
    """The users given validation and test lists: all, or ``limit`` drawn with ``seed``."""
    if n_users <= limit:
        return np.arange(n_users)
    return np.sort(np.random.default_rng(seed).choice(n_users, limit, replace=False))


def _fused_lists(
    fused: Fused, histories: list[np.ndarray], truth: np.ndarray, user: np.ndarray, length: int
) -> Lists:
    return Lists(right_align(histories, length), fused.items, positions(fused.items, truth),
                 user, fused.features)  # fmt: skip


def _eval_lists(
    histories: list[np.ndarray],
    truth: np.ndarray,
    cand: np.ndarray,
    users: np.ndarray,
    cfg: PipelineConfig,
) -> Lists:
    lists = eval_lists(histories, truth, cand, cfg.history_len)
    lists.user = users
    return lists


def prepare(dataset: Dataset, cfg: PipelineConfig, cache_dir: Path | None = None) -> Prepared:
    """Channels fitted on the training split; validation and test lists fused from them;
    leak-free fused training lists from channels fitted on the training split less each
    user's last ``fused_holdout`` items; item-kNN lists of plain ids beside them. The
    validation and test lists are those of ``eval_users``: each list's ``user`` says whose."""
    split = leave_last_out(dataset.sequences, dataset.times)
    n_users, n, n_items = len(dataset.users), cfg.n_candidates, dataset.n_items
    users = eval_users(n_users, cfg.max_eval_users, cfg.seed)
    val_hist = [split.val_history(u) for u in users.tolist()]
    test_hist = [split.test_history(u) for u in users.tolist()]
    val_truth, test_truth = split.val[users], split.test[users]
    minutes: dict[str, float] = {}
    with _timed("item-knn", minutes):
        knn = ItemKNN(split.train, n_items)
    channels = _fit_channels(cfg, split.train, n_items, split.val, "fit", minutes, knn)
    names = [c.name for c in channels]
    with _timed("fused val and test lists", minutes):
        val_ch = run_channels(channels, val_hist, cfg.channel_depth)
        test_ch = run_channels(channels, test_hist, cfg.channel_depth)
        voting = {c: val_ch[c] for c in cfg.channels if c in val_ch}
        if not voting:
            raise ValueError(f"no voting channel was fitted out of {cfg.channels}")
        fusion = (
            tune_rrf(voting, val_truth, n, n_items).fusion
            if cfg.tune_fusion
            else cfg.channel_params.fusion()
        )
        val_fused = fusion.fuse(val_ch, n, n_items)
        test_fused = fusion.fuse(test_ch, n, n_items)
    features = candidate_features(names)
    recall: dict[str, dict[str, float]] = {}
    channel_orders: dict[str, Lists] = {}
    for name in names:
        val_items, test_items = val_ch[name][0][:, :n], test_ch[name][0][:, :n]
        recall[name] = {
            f"val_recall@{n}": recall_at(val_items, val_truth),
            f"test_recall@{n}": recall_at(test_items, test_truth),
        }
        channel_orders[name] = _eval_lists(test_hist, test_truth, test_items, users, cfg)
    recall["fused"] = {
        f"val_recall@{n}": recall_at(val_fused.items, val_truth),
        f"test_recall@{n}": recall_at(test_fused.items, test_truth),
    }
    val_lists = _fused_lists(val_fused, val_hist, val_truth, users, cfg.history_len)
    test_lists = {
        "fused": _fused_lists(test_fused, test_hist, test_truth, users, cfg.history_len),
        # Plain ids, as a caller without recall features sends them.
        "item-knn": channel_orders["item-knn"]
        if "item-knn" in channel_orders
        else _eval_lists(test_hist, test_truth, knn.recall(test_hist, n)[0], users, cfg),
    }

    fit_train, queries = time_cut(split.train, cfg.fused_holdout, min_fit=cfg.min_history)
    first = queries.first_held_out(n_users)  # of every user: it early-stops SASRec's fit
    asked = np.bincount(queries.user, minlength=n_users)
    if asked.sum() > cfg.max_fused_queries:
        queries = queries.subset(capped_users(asked, cfg.max_fused_queries, cfg.seed))
    cut = _fit_channels(cfg, fit_train, n_items, first, "time-cut fit", minutes)
    if [c.name for c in cut] != names:  # the feature columns follow the channels' order
        raise ValueError(f"the time-cut fit gave channels {[c.name for c in cut]}, not {names}")
    with _timed("fused training lists", minutes):
        q_fused = fusion.fuse(run_channels(cut, queries.history, cfg.channel_depth), n, n_items)
        fused_train = _fused_lists(
            q_fused, queries.history, queries.target, queries.user, cfg.history_len
        )
        fused_train = fused_train.subset(fused_train.target >= 0)
    parts = [fused_train]
    if cfg.lists_per_user > 0:
        with _timed("item-knn training lists", minutes):
            lengths = np.array([len(seq) for seq in split.train])
            asked = lengths - np.maximum(cfg.min_history, lengths - cfg.lists_per_user)
            keep = capped_users(np.maximum(asked, 0), cfg.max_knn_queries, cfg.seed)
            knn_lists = training_lists(
                [split.train[u] for u in keep],
                knn,
                n,
                cfg.history_len,
                min_history=cfg.min_history,
                max_per_user=cfg.lists_per_user,
            )
            knn_lists.user = keep[knn_lists.user]  # back to the split's user indices
            parts.append(knn_lists)
    defaults = np.array([f["default"] for f in features], np.float32)
    train_lists = Lists.concat(parts, defaults)
    recall["fused training lists"] = {
        f"recall@{n}": recall_at(q_fused.items, queries.target) if len(queries.target) else 0.0,
        "lists": len(fused_train),
        "item-knn lists": len(train_lists) - len(fused_train),
    }
    with _timed("item features", minutes):
        cf, stats = item_features(split.train, split.train_times, dataset.numeric, knn, n_items)
    with _timed("text vectors", minutes):
        text = _text_vectors(dataset, cfg, cache_dir)
    sasrec = next((c for c in channels if isinstance(c, SASRecRecall)), None)
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
        candidate_features=features,
        fusion=fusion,
        channel_orders=channel_orders,
        sasrec=sasrec,
        minutes=minutes,
        fused_train_lists=len(fused_train),
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
        n_feats=len(prep.candidate_features),
        feat_defaults=tuple(float(f["default"]) for f in prep.candidate_features),
        feat_dropout=cfg.feat_dropout,
        cand_feat_dropout=cfg.cand_feat_dropout,
        cold_without_features=cfg.cold_without_features,
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


def fit(
    prep: Prepared, cfg: PipelineConfig, deadline: float | None = None
) -> tuple[Reranker, list[dict[str, float]]]:
    model = build_model(prep, cfg)
    return train(model, prep.train_lists, prep.val_lists, cfg.train, deadline)


def run(
    dataset: Dataset,
    models_dir: Path,
    cfg: PipelineConfig,
    cache_dir: Path | None = None,
    version: str | None = None,
    deadline: float | None = None,
) -> Path:
    """Everything: returns the exported model folder, with report.json/.md/.png inside.

    The reranker's training stops at ``deadline`` (``time.monotonic()``) if it comes before
    ``cfg.train.max_minutes`` is up; the evaluation and the export follow."""
    from training.evaluate import evaluate, write_report
    from training.recall_lists import save_recall

    started = time.monotonic()
    prep = prepare(dataset, cfg, cache_dir)
    print(f"prepared {len(prep.train_lists)} training lists; recall {json.dumps(prep.recall)}")
    with _timed("train", prep.minutes):
        model, log = fit(prep, cfg, deadline)
    with _timed("evaluate", prep.minutes):
        report = evaluate(prep, partial(predict, model), cfg)
    report["recall"] = prep.recall
    report["train_log"] = log
    report["minutes_per_step"] = prep.minutes
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
        model,
        dataset.item_ids,
        models_dir,
        version,
        extra,
        tower=item_tower(model, cfg, dataset),
        candidate_features=prep.candidate_features,
        write_more=partial(save_recall, prep=prep, cfg=cfg),
    )
    try:
        write_report(report, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no model folder without its report
        raise
    return folder
