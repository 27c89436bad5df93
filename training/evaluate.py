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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from training.features import transitions
from training.lists import Lists, right_align
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


class LightgbmInfo(TypedDict):
    features: list[str]
    trees: int


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


Lightgbm = tuple["lgb.Booster", FeatureBuilder]  # the trained trees and their features


def train_lightgbm(prep: Prepared, seed: int, max_lists: int = 20000) -> Lightgbm:
    """LambdaRank on the training lists, early-stopped on the validation lists."""
    import lightgbm as lgb

    rng = np.random.default_rng(seed)
    train = prep.train_lists
    if len(train) > max_lists:
        train = train.subset(np.sort(rng.choice(len(train), max_lists, replace=False)))
    val = prep.val_lists.subset(prep.val_lists.target >= 0)
    if len(val) > max_lists:
        val = val.subset(np.sort(rng.choice(len(val), max_lists, replace=False)))
    fb = FeatureBuilder(prep)

    def dataset(
        lists: Lists, leave_user_out: bool, reference: lgb.Dataset | None = None
    ) -> lgb.Dataset:
        labels = np.zeros(lists.cand.shape, dtype=np.float32)
        labels[np.arange(len(lists)), lists.target] = 1.0
        groups = np.full(len(lists), lists.cand.shape[1])
        features = fb.build(lists, leave_user_out)
        return lgb.Dataset(features, labels.ravel(), group=groups, reference=reference,
                           feature_name=fb.names)  # fmt: skip

    train_set = dataset(train, leave_user_out=True)
    params = {
        "objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "learning_rate": 0.05,
        "num_leaves": 31, "min_data_in_leaf": 50, "feature_fraction": 0.9,
        "num_threads": 2, "seed": seed, "verbose": -1,
    }  # fmt: skip
    booster = lgb.train(
        params, train_set, num_boost_round=400, valid_sets=[dataset(val, False, train_set)],
        callbacks=[lgb.early_stopping(30, verbose=False)],
    )  # fmt: skip
    return booster, fb


Scorer = Callable[[Lists], np.ndarray]  # candidate lists -> scores (M, N)


def _scores(method: str, lists: Lists, prep: Prepared, model: Scorer, lgbm: Lightgbm) -> np.ndarray:
    n = lists.cand.shape[1]
    if method == "recall order":
        return np.broadcast_to(-np.arange(n, dtype=np.float64), lists.cand.shape)
    if method == "popularity order":
        return prep.knn.count[lists.cand].astype(np.float64)
    if method == "lightgbm lambdarank":
        booster, fb = lgbm
        return np.asarray(booster.predict(fb.build(lists))).reshape(lists.cand.shape)
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
            pos = ranked_positions(_scores(method, lists, prep, model, lgbm), lists.target)
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
        "lightgbm": {"features": lgbm[1].names, "trees": int(lgbm[0].best_iteration)},
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
    s = report["sampled_protocol"]["deep reranker"]
    lines.append(
        f"- sampled protocol (test item + 100 random items, for papers only): "
        f"NDCG@10 {s['ndcg@10']:.4f}, HR@10 {s['hr@10']:.4f}"
    )
    if report.get("minutes_per_step"):
        steps = ", ".join(f"{k} {v:.2f}" for k, v in report["minutes_per_step"].items())
        lines.append(f"- minutes per step: {steps}")
    return "\n".join(lines) + "\n"


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
