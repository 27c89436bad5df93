"""Leave-last-out split: per user the last interaction is test, the one before validation.

Everything else is train. Recall, features and training read only ``train``; a user's
validation list reads ``train``; the test list reads ``train + [val]``. So nothing of a user's
test item reaches training, recall or the features of that user's test list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    train: list[np.ndarray]  # per user, item rows in time order
    train_times: list[np.ndarray]  # per user, when each training interaction happened
    val: np.ndarray  # (n_users,) item row
    test: np.ndarray  # (n_users,) item row

    def val_history(self, u: int) -> np.ndarray:
        return self.train[u]

    def test_history(self, u: int) -> np.ndarray:
        return np.append(self.train[u], self.val[u])


def leave_last_out(sequences: list[np.ndarray], times: list[np.ndarray]) -> Split:
    short = [i for i, s in enumerate(sequences) if len(s) < 3]
    if short:
        raise ValueError(f"users {short[:5]} have fewer than 3 interactions; cannot split")
    return Split(
        train=[s[:-2] for s in sequences],
        train_times=[t[:-2] for t in times],
        val=np.array([s[-2] for s in sequences]),
        test=np.array([s[-1] for s in sequences]),
    )
