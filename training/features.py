"""Fixed item features for the item tower, computed from the training split only.

- collaborative factors: the top singular vectors of the item co-occurrence (cosine) matrix,
  and of the "B follows A" transition matrix (left = as predecessor, right = as successor);
  these put the item-to-item signals that recall is built on into the item vector;
- statistics: log popularity, the mean position of an item in its users' timelines, the
  mean clock time of its interactions (what was being watched when), and the catalogue's
  numeric attributes (MovieLens: the release year).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from training.recall import ItemKNN, PairLookup

# Up to this many rows and columns, factors come from a dense SVD (MovieLens: 1,683): 64 MB
# of float32 at most. Past it, from scipy's truncated sparse SVD, the same factors up to
# each vector's sign and the solver's tolerance.
DENSE_SVD_MAX = 4096


def _svd_factors(m: sp.spmatrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` singular triplets of ``m`` as (U sqrt(S), V sqrt(S)), largest first."""
    if max(m.shape) <= DENSE_SVD_MAX:
        u, s, vt = np.linalg.svd(m.toarray(), full_matrices=False)
    else:
        u, s, vt = svds(sp.csr_matrix(m, dtype=np.float64), k=k, random_state=0)
        order = np.argsort(-s)
        u, s, vt = u[:, order], s[order], vt[order]
    scale = np.sqrt(s[:k])
    return (u[:, :k] * scale).astype(np.float32), (vt[:k].T * scale).astype(np.float32)


def transition_matrix(train: list[np.ndarray], n_items: int, window: int = 3) -> sp.csr_matrix:
    """(I+1, I+1) sparse float32 weights of b appearing within ``window`` steps after a,
    1/step each, summed in float64."""
    src, dst, val = [], [], []
    for seq in train:
        for step in range(1, window + 1):
            if len(seq) > step:
                src.append(seq[:-step])
                dst.append(seq[step:])
                val.append(np.full(len(seq) - step, 1.0 / step))
    size = n_items + 1
    if not src:
        return sp.csr_matrix((size, size), dtype=np.float32)
    t = sp.csr_matrix(
        (np.concatenate(val), (np.concatenate(src), np.concatenate(dst))), shape=(size, size)
    )  # duplicates are summed
    t.sum_duplicates()
    return sp.csr_matrix(t, dtype=np.float32)


def transitions(train: list[np.ndarray], n_items: int, window: int = 3) -> PairLookup:
    """``transition_matrix`` read as ``t[rows, cols]`` with broadcast index arrays."""
    return PairLookup(transition_matrix(train, n_items, window))


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)


def item_features(
    train: list[np.ndarray],
    train_times: list[np.ndarray],
    numeric: np.ndarray,
    knn: ItemKNN,
    n_items: int,
    n_cf: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Collaborative factors (I+1, n_cf) and statistics (I+1, 3 + n_numeric); row 0
    (padding) is zero. ``numeric`` (I, n_numeric) is the dataset's standardised numeric
    attributes, without missing values."""
    k_co, k_tr = n_cf // 2, n_cf // 4
    co, _ = _svd_factors(knn.sim, k_co)
    t = transition_matrix(train, n_items)
    t.data = np.log1p(t.data)  # log1p(0) = 0: the zeros stay implicit
    t.data /= t.data.max(initial=0.0) + 1e-6
    t_from, t_to = _svd_factors(t, k_tr)
    cf = np.concatenate([co, t_from, t_to], axis=1)
    cf = _standardise(cf[1:])

    counts = np.bincount(np.concatenate(train), minlength=n_items + 1)[1:].astype(np.float64)
    # Where in its users' timelines an item is watched: early (0) or late (1).
    position_sum, time_sum = np.zeros(n_items + 1), np.zeros(n_items + 1)
    for seq, when in zip(train, train_times, strict=True):
        np.add.at(position_sum, seq, np.linspace(0.0, 1.0, len(seq)))
        np.add.at(time_sum, seq, when)
    mean_pos = position_sum[1:] / np.maximum(counts, 1)
    all_times = np.concatenate(train_times)
    mean_time = np.where(counts > 0, time_sum[1:] / np.maximum(counts, 1), all_times.mean())
    usage = np.stack([np.log1p(counts), mean_pos, mean_time], axis=1)
    # The numeric attributes are standardised already, by the recipe a new item's are
    # (contract/items.py): they stay as they are, the last columns of the statistics.
    stats = np.concatenate([_standardise(usage), numeric.astype(np.float64)], axis=1)

    pad = np.zeros((1, cf.shape[1] + stats.shape[1]), dtype=np.float32)
    out = np.concatenate([pad, np.concatenate([cf, stats], axis=1).astype(np.float32)])
    return out[:, : cf.shape[1]], out[:, cf.shape[1] :]
