"""The ONNX graph's interface: its input and output names, their axes, and the padding rules.

The graph is ``Reranker.score`` (training/model.py), exported by training/export.py and run
by the service (app/model.py) and by ``rerank eval`` (training/onnx_scorer.py). B lists of N
candidates, histories of L items, item vectors of D floats::

    hist        (B, L, D) float32  history vectors, right-aligned: the newest item last
    hist_mask   (B, L)    bool     True at a real history item
    cand        (B, N, D) float32  candidate vectors in the caller's order, padding after
    cand_mask   (B, N)    bool     True at a real candidate
    cand_rank   (B, N)    float32  each candidate's position in the caller's list (optional)
    cand_feats  (B, N, F) float32  per-candidate features, raw values in the manifest's
                                   ``candidate_features`` order (optional; padded rows
                                   hold the defaults)

    scores      (B, N)    float32  higher first; a padded position's score means nothing
    attn        (B, N, L) float32  each candidate's attention over the history positions

Padding never changes a real candidate's score: masked positions are neither attended to nor
read as list context, so a caller may pad B, L and N to any size it likes (the service pads
to a few bucket sizes). An optional input that a graph does not declare is left out of its
feed, since ONNX Runtime refuses an undeclared input.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

HIST = "hist"
HIST_MASK = "hist_mask"
CAND = "cand"
CAND_MASK = "cand_mask"
CAND_RANK = "cand_rank"
CAND_FEATS = "cand_feats"
SCORES = "scores"
ATTN = "attn"

# What every graph declares, what a graph may declare, what the exporter writes (in the
# order of ``Reranker.score``'s arguments), and the outputs, in the order the graph returns.
REQUIRED_INPUTS = (HIST, HIST_MASK, CAND, CAND_MASK)
OPTIONAL_INPUTS = (CAND_RANK, CAND_FEATS)
KNOWN_INPUTS = REQUIRED_INPUTS + OPTIONAL_INPUTS
INPUTS = (HIST, HIST_MASK, CAND, CAND_MASK, CAND_RANK)
INPUTS_WITH_FEATS = (*INPUTS, CAND_FEATS)  # a model that declares candidate features
OUTPUTS = (SCORES, ATTN)

# The axes that vary from one run to the next, by name; D (and F) are fixed by the model.
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    HIST: {0: "B", 1: "L"},
    HIST_MASK: {0: "B", 1: "L"},
    CAND: {0: "B", 1: "N"},
    CAND_MASK: {0: "B", 1: "N"},
    CAND_RANK: {0: "B", 1: "N"},
    CAND_FEATS: {0: "B", 1: "N"},
    SCORES: {0: "B", 1: "N"},
    ATTN: {0: "B", 1: "N", 2: "L"},
}

FLOAT = np.dtype(np.float32)  # hist, cand, cand_rank, cand_feats, and both outputs
MASK = np.dtype(np.bool_)  # hist_mask, cand_mask


def right_align(
    rows: Sequence[np.ndarray], length: int, dtype: Any = FLOAT
) -> tuple[np.ndarray, np.ndarray]:
    """Histories ``(l_i, ...)`` -> ``(B, length, ...)`` ending at the last position, and mask.

    The newest item sits at the last position whatever the history's length, which is where
    the model reads the user's state. A history longer than ``length`` keeps its newest
    ``length`` items; padding is zeros, masked out.
    """
    tail = rows[0].shape[1:] if len(rows) else ()
    out = np.zeros((len(rows), length, *tail), dtype)
    mask = np.zeros((len(rows), length), MASK)
    for i, row in enumerate(rows):
        kept = row[len(row) - length :] if len(row) > length else row
        if len(kept):
            out[i, length - len(kept) :] = kept
            mask[i, length - len(kept) :] = True
    return out, mask


def left_align(
    rows: Sequence[np.ndarray], length: int, dtype: Any = FLOAT
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate lists ``(n_i, ...)`` -> ``(B, length, ...)`` from position 0, and mask.

    Candidates keep the caller's order; padding is zeros after them, masked out. A list
    longer than ``length`` is refused: dropping candidates is the caller's decision.
    """
    tail = rows[0].shape[1:] if len(rows) else ()
    out = np.zeros((len(rows), length, *tail), dtype)
    mask = np.zeros((len(rows), length), MASK)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"a list of {len(row)} candidates does not fit length={length}")
        out[i, : len(row)] = row
        mask[i, : len(row)] = True
    return out, mask


def list_positions(batch: int, n: int) -> np.ndarray:
    """``cand_rank`` of lists scored in the caller's order: 0, 1, ... n-1 in every row."""
    return np.broadcast_to(np.arange(n, dtype=FLOAT), (batch, n)).copy()


def missing_inputs(declared: Collection[str]) -> list[str]:
    """The required inputs that a graph's declared input names lack."""
    return [name for name in REQUIRED_INPUTS if name not in declared]


def feed(
    declared: Collection[str],
    hist: np.ndarray,
    hist_mask: np.ndarray,
    cand: np.ndarray,
    cand_mask: np.ndarray,
    cand_rank: np.ndarray | None = None,
    cand_feats: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The inputs of one run, by name: the required ones, and each optional one the graph
    declares (``declared``). A declared optional input that is not given is refused."""
    out = {HIST: hist, HIST_MASK: hist_mask, CAND: cand, CAND_MASK: cand_mask}
    for name, value in ((CAND_RANK, cand_rank), (CAND_FEATS, cand_feats)):
        if name in declared:
            if value is None:
                raise ValueError(f"the graph declares {name} and the feed has none")
            out[name] = value
    return out
