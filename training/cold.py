"""Items that arrive after training, offline: their "cold" vectors, and how well they rank.

- ``offline_cold_vectors``: every catalogue item's vector through the exported item tower
  (item_tower.onnx) on the text encoder's vectors, from the dataset's own columns: what
  ``POST /items`` computes for the item from its raw text and attributes (tests/test_items.py
  holds the two together to 1e-3).
- ``held_out``: the measurement of docs/model.md. A share of the items is held out of
  training entirely (every interaction with one is removed, except where it is a user's last
  item, the test target); a model is trained on the rest; on the test lists whose target is a
  held-out item, it ranks them with their cold vectors. Recall cannot find an item it never
  saw, so the target is put at a uniformly random position of the list (the caller knows
  nothing about a new item), in place of the last candidate; on the fused lists the other
  candidates keep their recall features and the new item has the defaults. Compared on the
  same lists: the caller's order, the service without the item's vector (the item unscored,
  after every scored candidate, in the caller's order) and the model with its cold vector.
  Also, as a rule the service does not follow yet, ``content rank``: every candidate scored
  on its cold vector (the history warm) and without recall features, a contest of content
  alone, and the new item placed at its rank in it (``content_scores``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract import ATTRS, ITEM_VEC, TEXT_VEC, read_manifest
from training.data import Dataset
from training.lists import Lists
from training.metrics import bootstrap_ratio_ci, ndcg_at, ranked_positions, summary
from training.pipeline import PipelineConfig, fit, prepare
from training.text import ENCODER
from training.train import predict


def offline_cold_vectors(folder: Path, dataset: Dataset, encoder: Path = ENCODER) -> np.ndarray:
    """(n_items, D) float32: the cold vector of each of the dataset's items, in its order."""
    import onnxruntime as ort

    from training.text import encode

    spec = read_manifest(folder).tower
    if spec is None:
        raise ValueError(f"{folder}: the manifest has no item_tower section")
    text = encode(dataset.texts, None, encoder)
    attrs = np.concatenate([dataset.categorical, dataset.numeric], axis=1).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / spec.file), options)
    (vectors,) = session.run([ITEM_VEC], {TEXT_VEC: text, ATTRS: attrs})
    return np.asarray(vectors, dtype=np.float32)


def hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, np.ndarray]:
    """The dataset without the interactions of a random ``fraction`` of the items, except a
    user's last one (the test target); and the held-out flag per item row (I+1,) bool.
    Users left with fewer than 3 interactions are dropped."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction} must be between 0 and 1")
    rng = np.random.default_rng(seed)
    n = dataset.n_items
    held = np.zeros(n + 1, dtype=bool)
    held[rng.choice(np.arange(1, n + 1), max(1, round(fraction * n)), replace=False)] = True
    users, sequences, times = [], [], []
    for user, seq, when in zip(dataset.users, dataset.sequences, dataset.times, strict=True):
        keep = ~held[seq]
        keep[-1] = True
        if keep.sum() >= 3:
            users.append(user)
            sequences.append(seq[keep])
            times.append(when[keep])
    return replace(dataset, users=users, sequences=sequences, times=times), held


def insert_target(
    lists: Lists, truth: np.ndarray, seed: int, defaults: np.ndarray | None = None
) -> Lists:
    """Each list with its true item ``truth`` (M,) at a uniformly random position, the list's
    other items in their order after dropping the last (N stays). Recall features move with
    their candidates; the inserted item, which no channel found, takes the ``defaults``
    (F,), as do the padded rows."""
    rng = np.random.default_rng(seed)
    m, n = lists.cand.shape
    cand = np.zeros_like(lists.cand)
    where = np.zeros(m, dtype=np.int64)
    given, feats = lists.feats, None
    if given is not None:
        if defaults is None:
            raise ValueError("lists with recall features need the features' defaults")
        feats = np.broadcast_to(defaults.astype(np.float32), given.shape).copy()
    for row in range(m):
        real = [i for i, c in enumerate(lists.cand[row].tolist()) if c and c != truth[row]]
        others = real[: n - 1]
        where[row] = rng.integers(0, len(others) + 1)
        order = [*others[: where[row]], -1, *others[where[row] :]]
        for pos, i in enumerate(order):
            cand[row, pos] = truth[row] if i < 0 else lists.cand[row, i]
            if feats is not None and given is not None and i >= 0:
                feats[row, pos] = given[row, i]
    return Lists(lists.hist, cand, where, lists.user, feats)


def unscored_positions(scores: np.ndarray, lists: Lists, missing: np.ndarray) -> np.ndarray:
    """Where each target ends when the ``missing`` candidates (M, N) are not scored: after
    every scored candidate, in the caller's order (the service's rule)."""
    real = lists.cand > 0
    scored = real & ~missing
    masked = np.where(scored, scores, -np.inf)
    pos = ranked_positions(masked, lists.target)
    rows = np.arange(len(lists))
    target_missing = missing[rows, lists.target]
    before = np.cumsum(missing & real, axis=1)[rows, lists.target] - 1
    return np.where(target_missing, scored.sum(axis=1) + before, pos)


def content_scores(model: Any, lists: Lists) -> np.ndarray:
    """Scores (M, N) with every candidate on its cold vector and without recall features,
    the history on its warm vectors: where a new item stands among the candidates when
    none of them brings its id embedding, usage or recall evidence."""
    tower = model.tower
    everything = torch.ones(tower.id_emb.weight.shape[0], dtype=torch.bool)

    def forward(hist_idx: torch.Tensor, cand_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        warm = tower.table()
        tower.cold_rows = everything
        try:
            cold = tower.table()
        finally:
            tower.cold_rows = None
        return tower.drop(warm[hist_idx]), tower.drop(cold[cand_idx])

    tower.forward = forward
    try:
        return predict(model, replace(lists, feats=None))
    finally:
        del tower.forward


def held_out(
    dataset: Dataset,
    cfg: PipelineConfig,
    fraction: float = 0.1,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train without the held-out items and measure their lists (see the module's text)."""
    reduced, held = hold_out(dataset, fraction, seed)
    prep = prepare(reduced, cfg, cache_dir)
    model, log = fit(prep, cfg)
    # The users with test lists (all of them up to PipelineConfig.max_eval_users), rows
    # whose test item is held out.
    users = prep.test_lists["fused"].user
    rows = np.flatnonzero(held[prep.split.test[users]])
    report: dict[str, Any] = {
        "fraction": fraction,
        "seed": seed,
        "held_out_items": int(held.sum()),
        "users": len(reduced.users),
        "lists": len(rows),
        "placement": "the target at a uniformly random position of the recall list",
        "train_log": log,
        "sources": {},
    }
    cold = torch.from_numpy(held)
    for source, all_lists in prep.test_lists.items():
        lists = insert_target(
            all_lists.subset(rows), prep.split.test[users[rows]], seed, prep.feature_defaults
        )
        warm_scores = predict(model, lists)
        model.tower.cold_rows = cold
        try:
            cold_scores = predict(model, lists)
        finally:
            model.tower.cold_rows = None
        cold_pos = ranked_positions(cold_scores, lists.target)
        unscored_pos = unscored_positions(warm_scores, lists, held[lists.cand] & (lists.cand > 0))
        content_pos = ranked_positions(content_scores(model, lists), lists.target)
        per = {
            "caller order": lists.target,
            "unscored": unscored_pos,
            "cold vectors": cold_pos,
            "content rank": content_pos,
        }
        ndcg = {name: ndcg_at(pos) for name, pos in per.items()}
        report["sources"][source] = {
            **{name: summary(pos) for name, pos in per.items()},
            "cold / caller order": float(
                ndcg["cold vectors"].mean() / max(ndcg["caller order"].mean(), 1e-9)
            ),
            "cold / caller order ci95 (paired)": bootstrap_ratio_ci(
                ndcg["cold vectors"], ndcg["caller order"], seed=seed
            ),
            "content rank / caller order": float(
                ndcg["content rank"].mean() / max(ndcg["caller order"].mean(), 1e-9)
            ),
            "content rank / caller order ci95 (paired)": bootstrap_ratio_ci(
                ndcg["content rank"], ndcg["caller order"], seed=seed
            ),
        }
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['held_out_items']} items held out of training ({report['fraction']:.0%}); "
        f"{report['lists']} test lists whose target is one, {report['placement']}.",
        "",
        "| recall | method | NDCG@10 | HR@10 | MRR |",
        "|---|---|---|---|---|",
    ]
    for source, rows in report["sources"].items():
        for method in ("caller order", "unscored", "cold vectors", "content rank"):
            if method not in rows:  # a report from before the method
                continue
            r = rows[method]
            lines.append(
                f"| {source} | {method} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | {r['mrr']:.4f} |"
            )
    lines.append("")
    for source, rows in report["sources"].items():
        lo, hi = rows["cold / caller order ci95 (paired)"]
        lines.append(
            f"- {source}: cold vectors / caller order = {rows['cold / caller order']:.2f}x "
            f"(paired 95% CI {lo:.2f}x to {hi:.2f}x)"
        )
        if "content rank / caller order" in rows:
            lo, hi = rows["content rank / caller order ci95 (paired)"]
            lines.append(
                f"- {source}: content rank / caller order = "
                f"{rows['content rank / caller order']:.2f}x (paired 95% CI {lo:.2f}x to {hi:.2f}x)"
            )
    return "\n".join(lines) + "\n"
