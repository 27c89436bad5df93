"""Candidate lists as the reranker meets them: a history, a recall list, the true next item.

Arrays are padded with item row 0: histories right-aligned to length L (newest last),
candidate lists in recall order. ``target`` is the true item's position in the list, or -1
when recall missed it (such a list scores 0 in evaluation and is not trained on). ``feats``
holds each candidate's recall features (``training/fusion.py``); None: a list of plain ids,
whose features all take their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract import right_align as align
from training.progress import progress
from training.recall import ItemKNN


@dataclass
class Lists:
    hist: np.ndarray  # (M, L) item rows, right-aligned
    cand: np.ndarray  # (M, N) item rows in recall order
    target: np.ndarray  # (M,) position of the true item in cand, -1 if absent
    user: np.ndarray  # (M,) user index
    feats: np.ndarray | None = None  # (M, N, F) float32 recall features; None: defaults

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, keep: np.ndarray) -> Lists:
        feats = None if self.feats is None else self.feats[keep]
        return Lists(self.hist[keep], self.cand[keep], self.target[keep], self.user[keep], feats)

    def with_features(self, defaults: np.ndarray) -> Lists:
        """The same lists with ``feats`` filled: the defaults (F,) where there are none."""
        if self.feats is not None or not len(defaults):
            return self
        feats = np.broadcast_to(defaults.astype(np.float32), (*self.cand.shape, len(defaults)))
        return Lists(self.hist, self.cand, self.target, self.user, feats.copy())

    @staticmethod
    def concat(parts: list[Lists], defaults: np.ndarray) -> Lists:
        """One set of lists from several of one shape; lists without features get the
        defaults (F,)."""
        parts = [p.with_features(defaults) for p in parts]
        feats = None if not len(defaults) else np.concatenate([p.feats for p in parts])  # type: ignore[misc]
        return Lists(
            np.concatenate([p.hist for p in parts]),
            np.concatenate([p.cand for p in parts]),
            np.concatenate([p.target for p in parts]),
            np.concatenate([p.user for p in parts]),
            feats,
        )


def right_align(histories: list[np.ndarray], length: int) -> np.ndarray:
    """Item rows (M, L), by the graph's history rule (contract/graph.py); row 0 pads."""
    rows, _ = align(histories, length, np.int64)
    return rows


def positions(cand: np.ndarray, truth: np.ndarray) -> np.ndarray:
    hit = cand == truth[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def eval_lists(
    histories: list[np.ndarray], truth: np.ndarray, cand: np.ndarray, history_len: int
) -> Lists:
    """One list per user: its history, a recall list (from any recall source) and its truth."""
    return Lists(
        right_align(histories, history_len),
        cand,
        positions(cand, truth),
        np.arange(len(histories)),
    )


def training_lists(
    train: list[np.ndarray],
    knn: ItemKNN,
    n: int,
    history_len: int,
    min_history: int = 3,
    max_per_user: int | None = None,
) -> Lists:
    """Time-shifted replays: the prefixes of every training sequence (the most recent
    ``max_per_user`` of them, so that a few heavy users do not dominate), kept where recall
    found the true next item: the lists the model meets online, with a positive to learn."""
    hists, cands, targets, users = [], [], [], []
    for u, seq in progress(enumerate(train), len(train), "training lists"):
        start = max(min_history, len(seq) - max_per_user) if max_per_user else min_history
        if len(seq) <= start:
            continue
        items, _ = knn.prefix_recall(seq, start, n)  # (T, n)
        truth = seq[start:]
        pos = positions(items, truth)
        for j in np.flatnonzero(pos >= 0):
            t = start + j
            hists.append(seq[max(0, t - history_len) : t])
            cands.append(items[j])
            targets.append(pos[j])
            users.append(u)
    return Lists(
        right_align(hists, history_len), np.stack(cands), np.array(targets), np.array(users)
    )
