"""The graph's padding rules and feed (contract/graph.py), which export, service and eval share."""

from __future__ import annotations

import numpy as np
import pytest

from contract import (
    CAND_FEATS,
    CAND_RANK,
    DYNAMIC_AXES,
    FLOAT,
    INPUTS,
    KNOWN_INPUTS,
    MASK,
    OUTPUTS,
    REQUIRED_INPUTS,
    feed,
    left_align,
    list_positions,
    missing_inputs,
    right_align,
)


def test_names() -> None:
    assert INPUTS == ("hist", "hist_mask", "cand", "cand_mask", "cand_rank")
    assert OUTPUTS == ("scores", "attn")
    assert set(REQUIRED_INPUTS) < set(INPUTS) < set(KNOWN_INPUTS)
    assert CAND_FEATS in KNOWN_INPUTS and CAND_FEATS not in INPUTS
    assert set(DYNAMIC_AXES) == set(KNOWN_INPUTS) | set(OUTPUTS)


def test_history_is_right_aligned_newest_last() -> None:
    hists = [np.array([[1.0], [2.0]]), np.zeros((0, 1)), np.array([[1.0], [2.0], [3.0], [4.0]])]
    out, mask = right_align(hists, 3)
    assert out.dtype == FLOAT and mask.dtype == MASK and out.shape == (3, 3, 1)
    assert out[0, :, 0].tolist() == [0.0, 1.0, 2.0] and mask[0].tolist() == [False, True, True]
    assert not mask[1].any() and not out[1].any()
    # too long: the newest items stay
    assert out[2, :, 0].tolist() == [2.0, 3.0, 4.0] and mask[2].all()


def test_item_rows_align_the_same_way() -> None:
    rows, mask = right_align([np.array([7, 8]), np.array([9])], 3, np.int64)
    assert rows.dtype == np.int64 and rows.tolist() == [[0, 7, 8], [0, 0, 9]]
    assert (mask == (rows > 0)).all()


def test_candidates_are_left_aligned_in_order() -> None:
    out, mask = left_align([np.array([5.0, 6.0]), np.array([7.0])], 4)
    assert out.tolist() == [[5, 6, 0, 0], [7, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="3 candidates does not fit length=2"):
        left_align([np.zeros(3)], 2)


def test_list_positions() -> None:
    ranks = list_positions(2, 3)
    assert ranks.dtype == FLOAT and ranks.tolist() == [[0, 1, 2], [0, 1, 2]]
    ranks[0, 0] = 9.0  # writable, a copy per call


def test_feed_holds_what_the_graph_declares() -> None:
    a = np.zeros((1, 1))
    rank = np.ones((1, 1))
    assert set(feed(REQUIRED_INPUTS, a, a, a, a, rank)) == set(REQUIRED_INPUTS)
    with_rank = feed(INPUTS, a, a, a, a, rank)
    assert set(with_rank) == set(INPUTS) and with_rank[CAND_RANK] is rank
    with pytest.raises(ValueError, match="declares cand_feats"):
        feed(KNOWN_INPUTS, a, a, a, a, rank)
    assert missing_inputs(["hist", "cand", "cand_rank"]) == ["hist_mask", "cand_mask"]


def test_the_contract_needs_numpy_and_the_standard_library_only() -> None:
    """Training and the service both import contract/: it may pull in neither's stack."""
    import subprocess
    import sys

    code = (
        "import sys, contract; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'onnxruntime', "
        "'fastapi', 'starlette', 'pydantic', 'redis', 'app', 'training'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
