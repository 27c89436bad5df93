"""Ranking metrics for one relevant item per list, and bootstrap intervals over users.

A list is described by the 0-based position of its true item after ranking, -1 when the
item is not in the list at all (recall missed it): such a list scores 0 on every metric.
"""

from __future__ import annotations

import numpy as np


def ndcg_at(pos: np.ndarray, k: int = 10) -> np.ndarray:
    hit = (pos >= 0) & (pos < k)
    return np.where(hit, 1.0 / np.log2(np.maximum(pos, 0) + 2.0), 0.0)


def hr_at(pos: np.ndarray, k: int = 10) -> np.ndarray:
    return ((pos >= 0) & (pos < k)).astype(np.float64)


def rr(pos: np.ndarray) -> np.ndarray:
    return np.where(pos >= 0, 1.0 / (np.maximum(pos, 0) + 1.0), 0.0)


def summary(pos: np.ndarray, k: int = 10) -> dict[str, float]:
    return {
        f"ndcg@{k}": float(ndcg_at(pos, k).mean()),
        f"hr@{k}": float(hr_at(pos, k).mean()),
        "mrr": float(rr(pos).mean()),
    }


def _resampled_users(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_users) user indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n_users, size=(n_boot, n_users))


def _interval(stats: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def bootstrap_ci(per_user: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling users with replacement."""
    idx = _resampled_users(len(per_user), n_boot, seed)
    return _interval(per_user[idx].mean(axis=1))


def bootstrap_ratio_ci(
    num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of mean(num) / mean(den) over users, both resampled with the same users."""
    idx = _resampled_users(len(num), n_boot, seed)
    return _interval(num[idx].mean(axis=1) / np.maximum(den[idx].mean(axis=1), 1e-9))


def ranked_positions(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Position of each list's target when sorted by score, descending; ties keep list order."""
    order = np.argsort(-scores, axis=1, kind="stable")
    pos = np.argmax(order == np.maximum(target, 0)[:, None], axis=1)
    return np.where(target >= 0, pos, -1)
