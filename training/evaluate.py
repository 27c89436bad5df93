"""Evaluation on the test split of ALL users (past ``max_eval_users``, the seeded sample of
them that has test lists, said in the report), against the baselines, with bootstrap intervals.

Every method reorders the same recall list per user: the fused list with its per-candidate
recall features, and the item-kNN list of plain ids (features at their defaults, as a
request without them). A test item that recall missed counts 0 for every method. Methods:
recall order, popularity order, a LightGBM LambdaRank reranker on hand-made features plus
the recall features, and our model. Each channel's own top-N list is scored in its own
order too. The sampled protocol (test item + 100 random unseen items) is reported apart,
labelled as such, for comparison with papers only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from training.features import transitions
from training.lists import Lists, positions, right_align
from training.metrics import bootstrap_ci, bootstrap_ratio_ci, ndcg_at, ranked_positions, summary

if TYPE_CHECKING:  # lightgbm loads only when the baseline trains; pipeline imports this module
    import lightgbm as lgb

    from training.pipeline import PipelineConfig, Prepared

METHODS = ["recall order", "popularity order", "lightgbm lambdarank", "deep reranker"]

# report.json. Keys with "@" or spaces take the functional TypedDict form.
Interval = tuple[float, float]
Metrics = dict[str, float]  # ndcg@10, hr@10, mrr: training.metrics.summary
MethodRow = TypedDict(
    "MethodRow", {"ndcg@10": float, "hr@10": float, "mrr": float, "ndcg@10_ci95": Interval}
)
Comparison = TypedDict(
    "Comparison",
    {
        "deep / recall order": float,
        "deep / recall order ci95 (paired)": Interval,
        "deep - lightgbm": float,
        "deep - lightgbm ci95 (paired)": Interval,
    },
)
SampledProtocol = TypedDict("SampledProtocol", {"note": str, "deep reranker": Metrics})


# The list kinds the report compares (``prep.test_lists``' keys): each gets its own trees,
# trained on training lists of its kind and early-stopped on validation lists of its kind.
LIST_KINDS = ("fused", "item-knn")
# LightGBM's settings that every grid entry shares. ``deterministic`` with ``force_col_wise``
# gives the same trees for the same data, seed and thread count (LightGBM's parameter docs).
# One thread: LightGBM's OpenMP threads spin at every barrier, and on a shared 2-core box
# two of them make a fit many times slower than one. Feature and query bagging make the
# seeds differ.
LIGHTGBM_BASE: dict[str, object] = {
    "objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "deterministic": True,
    "force_col_wise": True, "num_threads": 1, "verbose": -1, "feature_pre_filter": False,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1,
    "bagging_by_query": True,
}  # fmt: skip
# Tuned on validation NDCG@10 (``tune_lightgbm``); the best entry is retrained per seed.
LIGHTGBM_GRID: list[dict[str, float]] = [
    {"learning_rate": lr, "num_leaves": leaves, "min_data_in_leaf": min_leaf}
    for lr in (0.05, 0.15) for leaves, min_leaf in ((15, 50), (15, 400), (63, 400))
]  # fmt: skip
LIGHTGBM_SEEDS = 3
LIGHTGBM_ROUNDS = 500  # at most; early stopping ends every fit long before on MovieLens
LIGHTGBM_PATIENCE = 30  # rounds without a better validation NDCG@10


class GridRow(TypedDict):
    params: dict[str, float]
    val_ndcg: float  # validation NDCG@10 at the best round
    trees: int  # the best round


class KindInfo(TypedDict, total=False):
    train_lists: int
    val_lists: int
    tuned_on_lists: int  # the training lists the grid saw (a seeded sample past the cap)
    grid: list[GridRow]
    params: dict[str, float]  # the grid entry with the best validation NDCG@10
    seeds: list[int]
    trees: list[int]  # per seed
    val_ndcg: list[float]  # per seed
    test_ndcg: list[float]  # per seed; ``evaluate`` adds it
    test_ndcg_mean: float


class LightgbmInfo(TypedDict, total=False):
    features: list[str]
    kinds: dict[str, KindInfo]  # list kind -> its grid, choice, and trees per seed
    minutes: float  # features, tuning and the seeds' fits, all kinds


class ChannelRow(MethodRow):
    recall: float  # Recall@N of the channel's top-N list


class Report(TypedDict, total=False):
    """What ``evaluate`` returns; the pipeline and ``rerank eval`` add the last five keys."""

    users: int  # the test users scored
    users_total: int  # only when ``users`` is a sample of them
    n_candidates: int
    channels: dict[str, ChannelRow]  # each channel's top-N list in its own order
    summary: dict[str, dict[str, MethodRow]]  # recall source -> method -> metrics
    comparisons: dict[str, Comparison]  # recall source -> paired comparisons
    sampled_protocol: SampledProtocol
    lightgbm: LightgbmInfo
    recall: dict[str, dict[str, float]]
    train_log: list[dict[str, float]]
    minutes_per_step: dict[str, float]
    minutes: float
    scored_by: str


class FeatureBuilder:
    """Hand-made features of (history, candidate) pairs for the tree baseline."""

    names = [
        "rank", "log_rank", "log_pop", "mean_pos", "sim_sum", "sim_sum_rel", "sim_max",
        "sim_last", "sim_last5", "trans_last", "trans_last3", "attr_cos", "text_cos",
        "hist_len",
    ]  # fmt: skip

    def __init__(self, prep: Prepared) -> None:
        # The recall features of each candidate (training/fusion.py), as given.
        self.feature_names = [str(f["name"]) for f in prep.candidate_features]
        self.names = [*FeatureBuilder.names, *self.feature_names]
        self.defaults = prep.feature_defaults
        self.knn = prep.knn
        self.train = prep.split.train
        self.counts = transitions(prep.split.train, prep.dataset.n_items)  # raw weights
        self.mean_pos = prep.stats[:, 1]
        # The categorical attributes (MovieLens: genres), one unit row per item, row 0 padding.
        attrs = prep.dataset.categorical
        attrs = np.concatenate([np.zeros((1, attrs.shape[1]), np.float32), attrs])
        self.attrs = attrs / np.maximum(np.linalg.norm(attrs, axis=1, keepdims=True), 1e-6)
        self.text = prep.text

    def build(self, lists: Lists, leave_user_out: bool = False, chunk: int = 2000) -> np.ndarray:
        """(M * N, n_features) float32, rows in list order.

        ``leave_user_out`` for training lists: statistics of a candidate leave out the
        list's own user, whose later items are in the training data (see
        ``ItemKNN.sim_without_user``); without it the trees learn the leak.
        """
        return np.concatenate(
            [self._chunk(lists.subset(np.arange(s, min(s + chunk, len(lists)))), leave_user_out)
             for s in range(0, len(lists), chunk)]
        )  # fmt: skip

    def _own(self, lists: Lists) -> tuple[np.ndarray, np.ndarray]:
        """Per list: 1.0 where a candidate is among the user's training items (M, N), and the
        user's own transition weights from the last 3 history items to each candidate (M, 3, N)."""
        own = np.zeros(lists.cand.shape, dtype=np.float32)
        trans = np.zeros((len(lists), 3, lists.cand.shape[1]), dtype=np.float32)
        for u in np.unique(lists.user):
            rows = np.flatnonzero(lists.user == u)
            seq = self.train[u]
            own[rows] = np.isin(lists.cand[rows], seq)
            t_u = transitions([seq], self.knn.n_items)
            trans[rows] = t_u[lists.hist[rows][:, -3:, None], lists.cand[rows][:, None, :]]
        return own, trans

    def _chunk(self, lists: Lists, leave_user_out: bool) -> np.ndarray:
        hist, cand = lists.hist, lists.cand
        m, n = cand.shape
        mask = hist > 0  # (M, L)
        own, own_trans = self._own(lists) if leave_user_out else (np.zeros((m, n)), 0.0)
        count = self.knn.count[cand] - own  # (M, N) users per candidate, the list's user out
        co = self.knn.co[hist[:, :, None], cand[:, None, :]] - own[:, None, :]  # (M, L, N)
        norm = (
            np.sqrt(np.maximum(self.knn.count[hist], 1.0))[:, :, None]
            * np.sqrt(np.maximum(count, 1.0))[:, None, :]
        )
        sims = np.maximum(co, 0.0) / norm * mask[:, :, None]  # (M, L, N)
        sim_sum = sims.sum(axis=1)
        trans = (
            np.log1p(np.maximum(self.counts[hist[:, -3:, None], cand[:, None, :]] - own_trans, 0.0))
            * mask[:, -3:, None]
        )  # (M, 3, N)
        profile = (self.attrs[hist] * mask[..., None]).sum(axis=1)  # (M, A)
        profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-6)
        recent = self.text[hist[:, -10:]].mean(axis=1)  # (M, T), padding rows are zeros
        recent /= np.maximum(np.linalg.norm(recent, axis=1, keepdims=True), 1e-6)
        rank = np.broadcast_to(np.arange(n, dtype=np.float32), (m, n))
        cols = [
            rank,
            np.log1p(rank),
            np.log1p(count),
            self.mean_pos[cand],
            sim_sum,
            sim_sum / np.maximum(sim_sum.max(axis=1, keepdims=True), 1e-6),
            sims.max(axis=1),
            sims[:, -1],
            sims[:, -5:].sum(axis=1),
            trans[:, -1],
            trans.sum(axis=1),
            np.einsum("mna,ma->mn", self.attrs[cand], profile),
            np.einsum("mnt,mt->mn", self.text[cand], recent),
            np.broadcast_to(mask.sum(axis=1, keepdims=True), (m, n)),
        ]
        if self.feature_names:
            feats = np.asarray(lists.with_features(self.defaults).feats)  # (M, N, F)
            cols += [feats[..., j] for j in range(feats.shape[-1])]
        return np.stack(cols, axis=-1).reshape(m * n, -1).astype(np.float32)


@dataclass
class RankSet:
    """Lists as LightGBM reads them: features (M * N, F), 0/1 labels, one group of N a list."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray

    @staticmethod
    def of(fb: FeatureBuilder, lists: Lists, leave_user_out: bool) -> RankSet:
        labels = np.zeros(lists.cand.shape, dtype=np.float32)
        labels[np.arange(len(lists)), lists.target] = 1.0
        groups = np.full(len(lists), lists.cand.shape[1])
        return RankSet(fb.build(lists, leave_user_out), labels.ravel(), groups)

    def __len__(self) -> int:
        return len(self.groups)

    def sample(self, limit: int, seed: int) -> RankSet:
        """At most ``limit`` of the lists, a seeded sample in list order past it."""
        if len(self) <= limit:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), limit, replace=False))
        n = int(self.groups[0])
        rows = (keep[:, None] * n + np.arange(n)).ravel()
        return RankSet(self.x[rows], self.y[rows], self.groups[keep])


def fit_lambdarank(
    train: RankSet, val: RankSet, params: dict[str, float], seed: int, names: list[str]
) -> tuple[lgb.Booster, int, float]:
    """One booster with ``LIGHTGBM_BASE`` and ``params``, early-stopped on ``val``'s
    NDCG@10: the booster, its best round and that round's validation NDCG@10."""
    import lightgbm as lgb

    full = {**LIGHTGBM_BASE, **params, "seed": seed}
    train_set = lgb.Dataset(train.x, train.y, group=train.groups, feature_name=names,
                            params={"feature_pre_filter": False})  # fmt: skip
    val_set = lgb.Dataset(val.x, val.y, group=val.groups, reference=train_set)
    booster = lgb.train(
        full, train_set, num_boost_round=LIGHTGBM_ROUNDS, valid_sets=[val_set],
        callbacks=[lgb.early_stopping(LIGHTGBM_PATIENCE, verbose=False)],
    )  # fmt: skip
    return booster, int(booster.best_iteration), float(booster.best_score["valid_0"]["ndcg@10"])


def tune_lightgbm(
    train: RankSet, val: RankSet, grid: list[dict[str, float]], seed: int, names: list[str]
) -> tuple[int, list[GridRow]]:
    """Every grid entry fitted with ``seed``; the index of the best validation NDCG@10 (the
    first of equals) and each entry's row."""
    rows: list[GridRow] = []
    for entry in grid:
        _, trees, score = fit_lambdarank(train, val, entry, seed, names)
        rows.append({"params": entry, "val_ndcg": score, "trees": trees})
    best = max(range(len(rows)), key=lambda i: rows[i]["val_ndcg"])
    return best, rows


def kind_lists(prep: Prepared) -> dict[str, tuple[Lists, Lists]]:
    """Training and validation lists (those with the true item) of each of ``LIST_KINDS``.

    Fused: the fused training lists and ``prep.val_lists``. Item-kNN: the plain-id
    training lists (or, where the pipeline made none, the fused ones without their
    features) and item-kNN lists for the validation item, built here as the test ones are.
    """
    n_fused = prep.fused_train_lists
    fused_train = prep.train_lists.subset(np.arange(n_fused))
    knn_train = prep.train_lists.subset(np.arange(n_fused, len(prep.train_lists)))
    if not len(knn_train):
        knn_train = Lists(fused_train.hist, fused_train.cand, fused_train.target,
                          fused_train.user)  # fmt: skip
    users = prep.val_lists.user
    hist = [prep.split.val_history(u) for u in users.tolist()]
    cand = prep.knn.recall(hist, prep.val_lists.cand.shape[1])[0]
    knn_val = Lists(prep.val_lists.hist, cand, positions(cand, prep.split.val[users]), users)
    out = {"fused": (fused_train, prep.val_lists), "item-knn": (knn_train, knn_val)}
    return {k: (t.subset(t.target >= 0), v.subset(v.target >= 0)) for k, (t, v) in out.items()}


@dataclass
class Lightgbm:
    """The tree baseline: per list kind, one booster per seed, all on ``fb``'s features."""

    fb: FeatureBuilder
    boosters: dict[str, list[lgb.Booster]]
    info: LightgbmInfo

    def scores(self, kind: str, lists: Lists) -> list[np.ndarray]:
        """Each seed's scores (M, N) of ``lists`` by the boosters of ``kind``."""
        x = self.fb.build(lists)
        return [np.asarray(b.predict(x, num_threads=1)).reshape(lists.cand.shape)
                for b in self.boosters[kind]]  # fmt: skip


def train_lightgbm(
    prep: Prepared,
    seed: int,
    max_lists: int = 20_000,
    tune_lists: int = 4_000,
    grid: list[dict[str, float]] | None = None,
    n_seeds: int = LIGHTGBM_SEEDS,
) -> Lightgbm:
    """Per list kind: ``grid`` (default ``LIGHTGBM_GRID``) tuned on validation NDCG@10 with
    ``seed`` on at most ``tune_lists`` training lists, then the best entry fitted with
    ``n_seeds`` seeds (``seed``, ``seed + 1``, ...) on at most ``max_lists``; every fit is
    early-stopped on the kind's validation lists. Samples are seeded with ``seed``."""
    started = time.monotonic()
    fb = FeatureBuilder(prep)
    seeds = [seed + i for i in range(n_seeds)]
    boosters: dict[str, list[lgb.Booster]] = {}
    kinds: dict[str, KindInfo] = {}
    for kind, (train_lists, val_lists) in kind_lists(prep).items():
        train = RankSet.of(fb, train_lists, leave_user_out=True).sample(max_lists, seed)
        val = RankSet.of(fb, val_lists, leave_user_out=False)
        tuned = train.sample(tune_lists, seed)
        best, rows = tune_lightgbm(tuned, val, grid or LIGHTGBM_GRID, seed, fb.names)
        params = rows[best]["params"]
        fits = [fit_lambdarank(train, val, params, s, fb.names) for s in seeds]
        boosters[kind] = [b for b, _, _ in fits]
        kinds[kind] = {
            "train_lists": len(train), "val_lists": len(val), "tuned_on_lists": len(tuned),
            "grid": rows, "params": params, "seeds": seeds,
            "trees": [t for _, t, _ in fits], "val_ndcg": [v for _, _, v in fits],
        }  # fmt: skip
    info: LightgbmInfo = {
        "features": fb.names,
        "kinds": kinds,
        "minutes": round((time.monotonic() - started) / 60, 3),
    }
    return Lightgbm(fb, boosters, info)


Scorer = Callable[[Lists], np.ndarray]  # candidate lists -> scores (M, N)


def _scores(method: str, lists: Lists, prep: Prepared, model: Scorer) -> np.ndarray:
    n = lists.cand.shape[1]
    if method == "recall order":
        return np.broadcast_to(-np.arange(n, dtype=np.float64), lists.cand.shape)
    if method == "popularity order":
        return prep.knn.count[lists.cand].astype(np.float64)
    return model(lists)


def sampled_lists(
    prep: Prepared, n_neg: int, seed: int, history_len: int, users: np.ndarray | None = None
) -> Lists:
    """Test item + n_neg random items the user has not seen, in a random order; fewer where
    the catalogue has fewer unseen items, the list padded with row 0. ``users``: all if None."""
    rng = np.random.default_rng(seed)
    n_items = prep.dataset.n_items
    users = np.arange(len(prep.dataset.users)) if users is None else users
    hists, cands = [], []
    for u in users.tolist():
        hist = prep.split.test_history(u)
        seen = set(hist.tolist()) | {int(prep.split.test[u])}
        negatives: list[int] = []
        want = min(n_neg, n_items - len(seen))
        while len(negatives) < want:
            i = int(rng.integers(1, n_items + 1))
            if i not in seen:
                seen.add(i)
                negatives.append(i)
        hists.append(hist)
        listed = rng.permutation([int(prep.split.test[u]), *negatives])
        cands.append(np.pad(listed, (0, n_neg + 1 - len(listed))))
    cand = np.array(cands)
    target = np.argmax(cand == prep.split.test[users, None], axis=1)
    return Lists(right_align(hists, history_len), cand, target, users)


def _row(pos: np.ndarray, seed: int) -> MethodRow:
    got = summary(pos)
    return {
        "ndcg@10": got["ndcg@10"],
        "hr@10": got["hr@10"],
        "mrr": got["mrr"],
        "ndcg@10_ci95": bootstrap_ci(ndcg_at(pos), seed=seed),
    }


def _seeds_row(per_seed: list[np.ndarray], seed: int) -> tuple[MethodRow, np.ndarray]:
    """The row of a method fitted with several seeds (their positions): each metric's mean
    over the seeds, and the interval of the per-user NDCG@10 averaged over the seeds,
    which is also returned for the paired comparisons."""
    rows = [summary(pos) for pos in per_seed]
    per_user = np.mean([ndcg_at(pos) for pos in per_seed], axis=0)
    return {
        "ndcg@10": float(np.mean([r["ndcg@10"] for r in rows])),
        "hr@10": float(np.mean([r["hr@10"] for r in rows])),
        "mrr": float(np.mean([r["mrr"] for r in rows])),
        "ndcg@10_ci95": bootstrap_ci(per_user, seed=seed),
    }, per_user


def evaluate(prep: Prepared, model: Scorer, cfg: PipelineConfig) -> Report:
    """All methods on every list source; ``model`` scores candidate lists."""
    lgbm = train_lightgbm(prep, cfg.seed)
    n_users = len(prep.dataset.users)
    scored = prep.test_lists["fused"].user  # the users with test lists (pipeline.eval_users)
    channels: dict[str, ChannelRow] = {}
    for name, lists in prep.channel_orders.items():
        pos = np.where(lists.target >= 0, lists.target, -1)  # the channel's own order
        channels[name] = {**_row(pos, cfg.seed), "recall": float((lists.target >= 0).mean())}  # type: ignore[typeddict-item]
    results: dict[str, dict[str, MethodRow]] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    for source, lists in prep.test_lists.items():
        results[source], per_user[source] = {}, {}
        for method in METHODS:
            if method == "lightgbm lambdarank":
                per_seed = [ranked_positions(s, lists.target) for s in lgbm.scores(source, lists)]
                row, per_user[source][method] = _seeds_row(per_seed, cfg.seed)
                results[source][method] = row
                kind = lgbm.info["kinds"][source]
                kind["test_ndcg"] = [float(ndcg_at(pos).mean()) for pos in per_seed]
                kind["test_ndcg_mean"] = row["ndcg@10"]
                continue
            pos = ranked_positions(_scores(method, lists, prep, model), lists.target)
            results[source][method] = _row(pos, cfg.seed)
            per_user[source][method] = ndcg_at(pos)
    sampled = sampled_lists(prep, 100, cfg.seed, cfg.history_len, scored)
    sampled_pos = ranked_positions(model(sampled), sampled.target)
    comparisons: dict[str, Comparison] = {}
    for source, users in per_user.items():
        deep = users["deep reranker"]
        comparisons[source] = {
            "deep / recall order": float(deep.mean() / max(users["recall order"].mean(), 1e-9)),
            "deep / recall order ci95 (paired)": bootstrap_ratio_ci(
                deep, users["recall order"], seed=cfg.seed
            ),
            "deep - lightgbm": float(deep.mean() - users["lightgbm lambdarank"].mean()),
            "deep - lightgbm ci95 (paired)": bootstrap_ci(
                deep - users["lightgbm lambdarank"], seed=cfg.seed
            ),
        }
    report: Report = {
        "users": len(scored),
        "n_candidates": cfg.n_candidates,
        "channels": channels,
        "summary": results,
        "comparisons": comparisons,
        "sampled_protocol": {
            "note": "test item + 100 random unseen items, random order; NOT the service's task",
            "deep reranker": summary(sampled_pos),
        },
        "lightgbm": lgbm.info,
    }
    if len(scored) < n_users:
        report["users_total"] = n_users
    return report


def markdown(report: Report) -> str:
    n = report["n_candidates"]
    users = (
        f"A sample of {report['users']} of the {report['users_total']} test users (drawn "
        "with the run's seed)"
        if "users_total" in report
        else f"All {report['users']} test users"
    )
    lines = [
        f"{users}, top-{n} recall candidates; a test item that recall missed counts 0.",
        "",
    ]
    if report.get("channels"):
        lines += [
            f"| channel, its own top {n} | Recall@{n} | NDCG@10 (95% CI) | HR@10 | MRR |",
            "|---|---|---|---|---|",
        ]
        for name, ch in report["channels"].items():
            lo, hi = ch["ndcg@10_ci95"]
            lines.append(
                f"| {name} | {ch['recall']:.3f} | {ch['ndcg@10']:.4f} "
                f"({lo:.4f}-{hi:.4f}) | {ch['hr@10']:.4f} | {ch['mrr']:.4f} |"
            )
        lines.append("")
    lines += [
        "| recall | method | NDCG@10 (95% CI) | HR@10 | MRR |",
        "|---|---|---|---|---|",
    ]
    for source, rows in report["summary"].items():
        for method, r in rows.items():
            lo, hi = r["ndcg@10_ci95"]
            lines.append(
                f"| {source} | {method} | {r['ndcg@10']:.4f} ({lo:.4f}-{hi:.4f}) "
                f"| {r['hr@10']:.4f} | {r['mrr']:.4f} |"
            )
    lines.append("")
    for source, c in report["comparisons"].items():
        lo, hi = c["deep - lightgbm ci95 (paired)"]
        r_lo, r_hi = c["deep / recall order ci95 (paired)"]
        lines.append(
            f"- {source}: deep / recall order = {c['deep / recall order']:.2f}x "
            f"(paired 95% CI {r_lo:.2f}x to {r_hi:.2f}x); "
            f"deep - LightGBM = {c['deep - lightgbm']:+.4f} (paired 95% CI {lo:+.4f} to {hi:+.4f})"
        )
    lines += _lightgbm_lines(report)
    s = report["sampled_protocol"]["deep reranker"]
    lines.append(
        f"- sampled protocol (test item + 100 random items, for papers only): "
        f"NDCG@10 {s['ndcg@10']:.4f}, HR@10 {s['hr@10']:.4f}"
    )
    if report.get("minutes_per_step"):
        steps = ", ".join(f"{k} {v:.2f}" for k, v in report["minutes_per_step"].items())
        lines.append(f"- minutes per step: {steps}")
    return "\n".join(lines) + "\n"


def _lightgbm_lines(report: Report) -> list[str]:
    """The tree baseline's tuning: each list kind's grid with its validation NDCG@10 (the
    chosen entry marked), and the chosen entry's trees and test NDCG@10 per seed."""
    kinds = report.get("lightgbm", {}).get("kinds", {})
    if not kinds:
        return []
    keys = list(next(iter(kinds.values()))["grid"][0]["params"])
    lines = [
        "",
        "LightGBM LambdaRank, one set of trees per list kind: the grid on the kind's training "
        "lists (a seeded sample), chosen by validation NDCG@10 (*), then refitted per seed; "
        "every fit early-stopped on the kind's validation lists.",
        "",
        f"| lists | {' | '.join(keys)} | validation NDCG@10 | trees |",
        "|---|" + "---|" * (len(keys) + 2),
    ]
    for kind, info in kinds.items():
        for row in info["grid"]:
            mark = " *" if row["params"] == info["params"] else ""
            values = " | ".join(f"{row['params'][k]:g}" for k in keys)
            lines.append(f"| {kind}{mark} | {values} | {row['val_ndcg']:.4f} | {row['trees']} |")
    lines.append("")
    for kind, info in kinds.items():
        test = ", ".join(f"{v:.4f}" for v in info.get("test_ndcg", []))
        lines.append(
            f"- LightGBM {kind}: {info['train_lists']} training lists (grid on "
            f"{info['tuned_on_lists']}), {info['val_lists']} validation lists; seeds "
            f"{', '.join(map(str, info['seeds']))}: trees {', '.join(map(str, info['trees']))}, "
            f"test NDCG@10 {test} (mean {info.get('test_ndcg_mean', float('nan')):.4f})"
        )
    return lines


def write_report(report: Report, folder: Path) -> None:
    """report.json, report.md and report.png beside the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    sources = list(report["summary"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        rows = [report["summary"][s][method] for s in sources]
        means = [r["ndcg@10"] for r in rows]
        err = np.array([[r["ndcg@10"] - r["ndcg@10_ci95"][0], r["ndcg@10_ci95"][1] - r["ndcg@10"]]
                        for r in rows]).T  # fmt: skip
        ax.bar(np.arange(len(sources)) + i * width, means, width, yerr=err, label=method, capsize=3)
    ax.set_xticks(np.arange(len(sources)) + width * (len(METHODS) - 1) / 2, sources)
    ax.set_ylabel("NDCG@10 (test, a sample of users)" if "users_total" in report
                  else "NDCG@10 (test, all users)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "report.png", dpi=100)
    plt.close(fig)
