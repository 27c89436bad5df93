"""Our NDCG agrees with an independent implementation (ranx)."""

import numpy as np
import pytest

from training.metrics import bootstrap_ci, ndcg_at, ranked_positions, summary


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaTypeSafetyWarning")
def test_ndcg_matches_ranx() -> None:
    from ranx import Qrels, Run, evaluate

    rng = np.random.default_rng(0)
    n_users, n_cand = 200, 30
    cand = np.array([rng.permutation(1000)[:n_cand] for _ in range(n_users)])
    scores = rng.normal(size=(n_users, n_cand))
    # 30 users whose true item recall missed: they count 0 in our metric and in ranx.
    truth = np.where(
        np.arange(n_users) < 30, 5000, cand[np.arange(n_users), rng.integers(0, n_cand, n_users)]
    )
    target = np.where(truth == 5000, -1, np.argmax(cand == truth[:, None], axis=1))
    ours = ndcg_at(ranked_positions(scores, target), 10).mean()

    qrels = Qrels({f"u{u}": {f"i{truth[u]}": 1} for u in range(n_users)})
    run = Run(
        {
            f"u{u}": {f"i{c}": float(s) for c, s in zip(cand[u], scores[u], strict=True)}
            for u in range(n_users)
        }
    )
    theirs = evaluate(qrels, run, "ndcg@10")
    assert abs(ours - theirs) < 1e-9
    assert 0 < ours < 1


def test_summary_and_interval() -> None:
    pos = np.array([0, 1, 9, 10, -1])
    s = summary(pos)
    assert s["hr@10"] == 3 / 5
    assert np.isclose(s["mrr"], (1 + 1 / 2 + 1 / 10 + 1 / 11) / 5)
    lo, hi = bootstrap_ci(ndcg_at(pos))
    assert lo <= s["ndcg@10"] <= hi


def test_ties_keep_recall_order() -> None:
    scores = np.zeros((1, 4))
    assert ranked_positions(scores, np.array([2])).tolist() == [2]
