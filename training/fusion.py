"""Fusion of recall channels into one top-K list per history, with per-candidate features.

Reciprocal-rank fusion: a candidate at 1-based rank r in channel c earns ``w_c / (k + r)``;
the fused list is the candidates with a positive sum, best first, ties broken by item row,
padded with item row 0 where fewer than K exist. Channels with weight 0 do not vote but
still give features.

Features of each fused candidate, per channel in the order given: its 1-based rank there
(``RANK_DEFAULT`` where the channel did not return it) and its score there
(``SCORE_DEFAULT`` where absent). ``candidate_features`` is the one list of names and
defaults, in the order of the feature axis, ready for the manifest's ``candidate_features``.

Training lists, leak-free: ``time_cut`` holds out the last items of every training
sequence; channels fitted on the rest answer for the held-out positions, whose histories
hold items the fit never saw, exactly as at validation and test time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.channels import EASE, Channel, Markov
from training.metrics import summary
from training.recall import ALSRecall, ItemKNN
from training.sasrec import SASRecConfig, SASRecRecall

RANK_DEFAULT = 1000.0  # a candidate the channel did not return
SCORE_DEFAULT = 0.0

# The channels that vote in the fused list, and every channel ``fit_channels`` knows.
FUSED_CHANNELS = ("ease", "markov", "sasrec")
ALL_CHANNELS = ("ease", "markov", "sasrec", "item-knn", "als")

ChannelLists = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (items, scores), (B, M) each


def feature_prefix(channel: str) -> str:
    """Channel name as a feature-name prefix: ``item-knn`` -> ``item_knn``."""
    return channel.replace("-", "_")


def candidate_features(channels: Sequence[str]) -> list[dict[str, str | float]]:
    """``[{"name": "ease_rank", "default": 1000.0}, {"name": "ease_score", ...}, ...]``."""
    out: list[dict[str, str | float]] = []
    for c in channels:
        out.append({"name": f"{feature_prefix(c)}_rank", "default": RANK_DEFAULT})
        out.append({"name": f"{feature_prefix(c)}_score", "default": SCORE_DEFAULT})
    return out


@dataclass
class Fused:
    items: np.ndarray  # (B, K) item rows best first, 0 where the list ran out
    score: np.ndarray  # (B, K) fused score, 0.0 at padding
    features: np.ndarray  # (B, K, F) float32, in ``names`` order; defaults at padding
    names: list[str]


@dataclass
class RRF:
    weights: dict[str, float]  # channel name -> weight; a missing channel weighs 0
    k: float = 60.0

    def fused_top(
        self, lists: ChannelLists, rows: slice, n: int, n_items: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(b, n) item rows and fused scores for the histories in ``rows``: the items with a
        positive fused score, best first, ties by row, then item row 0 and score 0.

        Votes are added channel by channel into a zeroed (b, I+1) buffer at the items the
        channels return (the same floats as a dense sum), and read back only there: the
        top ``n`` come from the (b, channels x depth) returned items, never from a full
        (b, I+1) ranking.
        """
        b = rows.stop - rows.start
        r = np.arange(b)[:, None]
        items_out, score_out = np.zeros((b, n), dtype=np.int64), np.zeros((b, n))
        voting = [(w, items[rows], scores[rows]) for name, (items, scores) in lists.items()
                  if (w := self.weights.get(name, 0.0)) > 0]  # fmt: skip
        if not voting or not voting[0][1].shape[1]:
            return items_out, score_out
        total = np.zeros((b, n_items + 1))  # calloc: only the pages written are touched
        for w, it, sc in voting:
            rank = np.arange(1, it.shape[1] + 1)[None, :]
            # top_n fills a short list with -inf-scored seen items: those are not recalled.
            total[r, it] += np.where(np.isfinite(sc), w / (self.k + rank), 0.0)
        cand = np.sort(np.concatenate([it for _, it, _ in voting], axis=1), axis=1)  # (b, M)
        score = total[r, cand]
        repeat = np.zeros(cand.shape, dtype=bool)
        repeat[:, 1:] = cand[:, 1:] == cand[:, :-1]
        score = np.where(repeat | (cand == 0) | ~(score > 0), -np.inf, score)
        order = np.argsort(-score, axis=1, kind="stable")[:, :n]  # score desc, then row asc
        best, best_score = np.take_along_axis(cand, order, 1), np.take_along_axis(score, order, 1)
        found = np.isfinite(best_score)
        m = best.shape[1]
        items_out[:, :m] = np.where(found, best, 0)
        score_out[:, :m] = np.where(found, best_score, 0.0)
        return items_out, score_out

    def order(self, lists: ChannelLists, n: int, n_items: int, chunk: int = 512) -> np.ndarray:
        """(B, n) fused item rows only; what tuning needs."""
        return self.fuse(lists, n, n_items, chunk, features=False).items

    def fuse(
        self,
        lists: ChannelLists,
        n: int,
        n_items: int,
        chunk: int = 512,
        features: bool = True,
    ) -> Fused:
        names = [str(c["name"]) for c in candidate_features(list(lists))]
        n_hist = len(next(iter(lists.values()))[0]) if lists else 0
        items_out = np.zeros((n_hist, n), dtype=np.int64)
        score_out = np.zeros((n_hist, n))
        feats = np.zeros((n_hist, n, len(names) if features else 0), dtype=np.float32)
        for s in range(0, n_hist, chunk):
            rows = slice(s, min(s + chunk, n_hist))
            items, score = self.fused_top(lists, rows, n, n_items)
            items_out[rows], score_out[rows] = items, score
            if features:
                feats[rows] = _features(lists, rows, items, n_items)
        return Fused(items_out, score_out, feats, names)


def _features(lists: ChannelLists, rows: slice, cand: np.ndarray, n_items: int) -> np.ndarray:
    """(b, K, 2 * channels): rank and score of each candidate in each channel, looked up
    by ``history * (I+1) + item`` in each channel's sorted pairs (a channel's list holds an
    item once)."""
    b = rows.stop - rows.start
    r = np.arange(b)[:, None]
    wanted = r * (n_items + 1) + cand  # (b, K)
    out = []
    for items, scores in lists.values():
        it, sc = items[rows], scores[rows]
        rank = np.full(cand.shape, RANK_DEFAULT)
        value = np.full(cand.shape, SCORE_DEFAULT)
        if it.size:
            key = (r * (n_items + 1) + it).ravel()
            order = np.argsort(key, kind="stable")
            at = order[np.searchsorted(key[order], wanted).clip(max=len(key) - 1)]  # (b, K)
            flat_sc = sc.ravel()[at]
            ok = (key[at] == wanted) & (cand > 0) & np.isfinite(flat_sc)  # 0: padding
            rank = np.where(ok, at % it.shape[1] + 1.0, RANK_DEFAULT)
            value = np.where(ok, flat_sc, SCORE_DEFAULT)
        out += [rank, value]
    return np.stack(out, axis=-1).astype(np.float32)


def run_channels(
    channels: Sequence[Channel], histories: list[np.ndarray], depth: int, chunk: int = 2048
) -> ChannelLists:
    """Each channel's top ``depth`` list for every history, ``chunk`` histories at a time
    (a dense channel holds a (chunk, items) score matrix at once)."""
    out: ChannelLists = {}
    for c in channels:
        parts = [c.recall(histories[s : s + chunk], depth)
                 for s in range(0, max(len(histories), 1), chunk)]  # fmt: skip
        out[c.name] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


def build_lists(
    channels: Sequence[Channel],
    fusion: RRF,
    histories: list[np.ndarray],
    n: int,
    n_items: int,
    depth: int = 200,
) -> Fused:
    """Fused top-``n`` lists and their features for arbitrary histories (any prefixes).

    Leak-free only if no channel saw the items that follow each history: see ``time_cut``.
    """
    return fusion.fuse(run_channels(channels, histories, depth), n, n_items)


def positions(items: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """0-based position of each truth in its list, -1 where the list missed it."""
    hit = items == truth[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def list_metrics(items: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """NDCG@10, HR@10 and MRR of the list's own order, and Recall@len(list)."""
    pos = positions(items, truth)
    out = summary(pos)
    out[f"recall@{items.shape[1]}"] = float((pos >= 0).mean())
    return out


@dataclass
class Tuned:
    fusion: RRF
    score: float
    trials: list[dict[str, object]] = field(default_factory=list)


def tune_rrf(
    lists: ChannelLists,
    truth: np.ndarray,
    n: int,
    n_items: int,
    ks: Sequence[float] = (10.0, 30.0, 60.0, 120.0),
    grid: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0),
    metric: str = "ndcg@10",
    passes: int = 2,
    max_rows: int = 20_000,
) -> Tuned:
    """Weights and k of RRF by coordinate ascent on the validation lists: start from equal
    weights, then, per pass, each channel's weight over ``grid`` and k over ``ks``.

    Past ``max_rows`` histories, on a fixed random ``max_rows`` of them: each trial fuses
    every row it scores, about 40 trials."""
    if len(truth) > max_rows:
        keep = np.sort(np.random.default_rng(0).choice(len(truth), max_rows, replace=False))
        lists = {c: (items[keep], scores[keep]) for c, (items, scores) in lists.items()}
        truth = truth[keep]
    names = list(lists)
    trials: list[dict[str, object]] = []

    def score(weights: dict[str, float], k: float) -> float:
        if not any(w > 0 for w in weights.values()):
            return -1.0
        m = list_metrics(RRF(weights, k).order(lists, n, n_items), truth)
        trials.append({"weights": dict(weights), "k": k, **m})
        return m[metric]

    weights, k = dict.fromkeys(names, 1.0), ks[len(ks) // 2]
    best = score(weights, k)
    for _ in range(passes):
        improved = False
        for name, w in itertools.product(names, grid):
            if w == weights[name]:
                continue
            trial = {**weights, name: w}
            s = score(trial, k)
            if s > best:
                best, weights, improved = s, trial, True
        for kk in ks:
            if kk != k and (s := score(weights, kk)) > best:
                best, k, improved = s, kk, True
        if not improved:
            break
    return Tuned(RRF(weights, k), best, trials)


@dataclass
class PrefixQueries:
    """Histories (prefixes of training sequences) and the item that followed each."""

    user: np.ndarray  # (M,) user index
    history: list[np.ndarray]  # M prefixes, time order
    target: np.ndarray  # (M,) the next item of each prefix

    def subset(self, users: np.ndarray) -> PrefixQueries:
        """The queries of ``users`` only, in their order here."""
        keep = np.isin(self.user, users)
        history = [h for h, k in zip(self.history, keep, strict=True) if k]
        return PrefixQueries(self.user[keep], history, self.target[keep])

    def first_held_out(self, n_users: int) -> np.ndarray:
        """(n_users,) each user's first held-out item, 0 where none: the item right after
        the fitted part, which early-stops a sequential channel fitted on that part."""
        first = np.zeros(n_users, dtype=np.int64)
        first[self.user[::-1]] = self.target[::-1]  # the earliest write wins: written last
        return first


def time_cut(
    train: list[np.ndarray], holdout: int, min_fit: int = 3
) -> tuple[list[np.ndarray], PrefixQueries]:
    """Hold out the last ``holdout`` items of every training sequence (fewer where the
    sequence would keep under ``min_fit`` items).

    Returns the shortened sequences, to fit a second set of channels on, and one query per
    held-out position: the prefix before it (which holds the earlier held-out items, unseen
    by the fit, as a test history holds the validation item) and the item itself. Nothing a
    query's target or later items did reaches the channels that answer it.
    """
    if holdout < 1:
        raise ValueError(f"holdout must be >= 1, got {holdout}")
    fit, users, hists, targets = [], [], [], []
    for u, seq in enumerate(train):
        h = max(0, min(holdout, len(seq) - min_fit))
        cut = len(seq) - h
        fit.append(seq[:cut])
        for t in range(cut, len(seq)):
            users.append(u)
            hists.append(seq[:t])
            targets.append(seq[t])
    queries = PrefixQueries(
        np.array(users, dtype=np.int64), hists, np.array(targets, dtype=np.int64)
    )
    return fit, queries


@dataclass
class ChannelParams:
    """Hyperparameters of the fused channels; the defaults are the ones chosen on
    MovieLens-100K's validation split (docs/results/)."""

    ease_lambda: float = 50.0
    ease_decay: float = 0.95
    markov_window: int = 10
    markov_gap_decay: float = 0.5
    markov_alpha: float = 0.5
    markov_last: int = 10
    markov_query_decay: float = 0.9
    # 5 minutes a fit: the pipeline fits SASRec twice (the training split, and its time cut)
    # within `make train`'s 25 minutes. Its validation score moves by 0.005-0.01 from epoch to
    # epoch while it still rises, so a patience of 10 lets the time cap end the fit.
    sasrec: SASRecConfig = field(default_factory=lambda: SASRecConfig(max_minutes=5.0, patience=10))
    rrf_weights: dict[str, float] = field(
        default_factory=lambda: {"ease": 2.0, "markov": 1.0, "sasrec": 1.0}
    )
    rrf_k: float = 60.0

    def fusion(self) -> RRF:
        return RRF(dict(self.rrf_weights), self.rrf_k)


def fit_channels(
    train: list[np.ndarray],
    n_items: int,
    val: np.ndarray | None,
    params: ChannelParams,
    names: Sequence[str] = FUSED_CHANNELS,
) -> list[Channel]:
    """Fit the named channels on ``train`` only; ``val`` (the item after each training
    sequence, 0 where none) early-stops SASRec. Past its size limit, EASE fits on the most
    popular items (``training.channels.EASE``)."""
    out: list[Channel] = []
    for name in names:
        if name == "ease":
            out.append(EASE(train, n_items, params.ease_lambda, params.ease_decay))
        elif name == "markov":
            out.append(
                Markov(
                    train,
                    n_items,
                    window=params.markov_window,
                    gap_decay=params.markov_gap_decay,
                    alpha=params.markov_alpha,
                    last=params.markov_last,
                    query_decay=params.markov_query_decay,
                )
            )
        elif name == "sasrec":
            out.append(SASRecRecall(train, n_items, val, params.sasrec))
        elif name == "item-knn":
            out.append(ItemKNN(train, n_items))
        elif name == "als":
            out.append(ALSRecall(train, n_items, seed=params.sasrec.seed))
        else:
            raise ValueError(f"unknown recall channel {name!r}; known: {ALL_CHANNELS}")
    return out
