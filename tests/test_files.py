"""Your own data: the files contract, its checks (exit status 2, one line per problem that
names the file, the column and the line or id), and `rerank data` / `rerank train` on files."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training import cli
from training.files import MAX_VALUES, read_dataset

INTERACTIONS = """user_id,item_id,timestamp
u1,00042,1700000000
u1,42,1700000100
u1,7,1700000200
u2,7,2023-11-14T22:13:20Z
u2,42,2023-11-14T22:15:00+00:00
u2,00042,1700000400.5
"""
ITEMS = """item_id,text,genres,year
00042,"The answer, padded",Drama|Comedy,1990
42,The answer,Drama,
7,Seven,Comedy,2001
"""


def _write(folder: Path, interactions: str = INTERACTIONS, items: str = ITEMS) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "interactions.csv").write_text(interactions)
    (folder / "items.csv").write_text(items)
    return folder / "interactions.csv", folder / "items.csv"


def _train(
    capsys: pytest.CaptureFixture[str], inter: Path, items: Path, *extra: str
) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = cli.main(["train", "--interactions", str(inter), "--items", str(items), *extra])
    return rc, capsys.readouterr().err.strip().splitlines()


def _one(lines: list[str], *parts: str) -> str:
    """The one stderr line that holds every part."""
    found = [line for line in lines if all(p in line for p in parts)]
    assert len(found) == 1, (parts, lines)
    return found[0]


# --- reading --------------------------------------------------------------------------


def test_ids_are_text_and_time_orders_each_user(tmp_path: Path) -> None:
    ds = read_dataset(*_write(tmp_path), say=None)
    assert ds.item_ids == ["00042", "42", "7"], "00042 and 42 are two items"
    assert ds.users == ["u1", "u2"]
    names = [[ds.item_ids[r - 1] for r in seq] for seq in ds.sequences]
    # u2: ISO 8601 times (22:13:20Z is 1700000000) before the later epoch float.
    assert names == [["00042", "42", "7"], ["7", "42", "00042"]]
    assert ds.times[1].tolist() == [1700000000.0, 1700000100.0, 1700000400.5]


def test_file_order_breaks_ties(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp\nu,7,5\nu,42,5\nu,00042,5\nu,7,1\n"
    ds = read_dataset(*_write(tmp_path, inter), say=None)
    assert [ds.item_ids[r - 1] for r in ds.sequences[0]] == ["7", "7", "42", "00042"]


def test_attributes_categorical_and_numeric(tmp_path: Path) -> None:
    items = (
        "item_id,text,genres,year,code\n"
        "1,a,Drama|Comedy,1990,007\n2,b,Drama,,010\n3,c,Comedy,2000,007\n"
    )
    inter = "user_id,item_id,timestamp\nu,1,1\nu,2,2\nu,3,3\n"
    lines: list[str] = []
    ds = read_dataset(*_write(tmp_path, inter, items), say=lines.append)
    # "007" is a code, not the number 7; a value on one item only is not a column.
    assert ds.categorical_names == ["genres=Comedy", "genres=Drama", "code=007"]
    assert ds.categorical.tolist() == [[1, 1, 1], [0, 1, 0], [1, 0, 1]]
    assert ds.numeric_names == ["year"]
    year = ds.numeric[:, 0]  # the missing year is the median (1995), then standardised
    assert year[1] == pytest.approx(0.0, abs=1e-5) and year[0] == pytest.approx(-year[2])
    assert ds.texts[0] == "a. Genres: Drama, Comedy. Code: 007."
    summary = "\n".join(lines)
    assert "1 users, 3 items, 3 interactions" in summary
    assert "genres: categorical, 2 values" in summary and "year: numeric, 1 missing" in summary


def test_many_categorical_values_are_capped(tmp_path: Path) -> None:
    n = 2 * MAX_VALUES + 10
    rows = "".join(f"{i},t,v{i // 2}\n" for i in range(n))  # every value on two items
    inter = "user_id,item_id,timestamp\nu,0,1\nu,1,2\nu,2,3\n"
    ds = read_dataset(*_write(tmp_path, inter, "item_id,text,tag\n" + rows), say=None)
    assert ds.categorical.shape == (n, MAX_VALUES)


def test_csv_gz_and_parquet_read_like_csv(tmp_path: Path) -> None:
    import pandas as pd

    inter, items = _write(tmp_path / "csv")
    want = read_dataset(inter, items, say=None)
    gz = tmp_path / "gz"
    gz.mkdir()
    for path in (inter, items):
        with gzip.open(gz / (path.name + ".gz"), "wt") as f:
            f.write(path.read_text())
    got = read_dataset(gz / "interactions.csv.gz", gz / "items.csv.gz", say=None)
    assert got.item_ids == want.item_ids and got.texts == want.texts

    pq = tmp_path / "pq"
    pq.mkdir()
    frame = pd.read_csv(inter, dtype=str, keep_default_na=False)
    frame.to_parquet(pq / "interactions.parquet")
    cat = pd.read_csv(items, dtype=str, keep_default_na=False)
    cat["year"] = pd.to_numeric(cat["year"])  # a float column with a missing value
    cat["genres"] = [v.split("|") for v in cat["genres"]]  # lists are categorical too
    cat.to_parquet(pq / "items.parquet")
    got = read_dataset(pq / "interactions.parquet", pq / "items.parquet", say=None)
    assert got.item_ids == want.item_ids
    assert [s.tolist() for s in got.sequences] == [s.tolist() for s in want.sequences]
    np.testing.assert_allclose(got.numeric, want.numeric, atol=1e-6)
    assert got.categorical_names == want.categorical_names

    # Integer ids in parquet are text too; 42 stays "42", never "42.0".
    ints = pd.DataFrame({"item_id": [42, 7], "text": ["a", "b"]})
    ints.to_parquet(pq / "ints.parquet")
    inter_ints = pd.DataFrame(
        {"user_id": [1, 1, 1], "item_id": [42, 7, 42], "timestamp": [1, 2, 3]}
    )
    inter_ints.to_parquet(pq / "inter_ints.parquet")
    got = read_dataset(pq / "inter_ints.parquet", pq / "ints.parquet", say=None)
    assert got.item_ids == ["42", "7"] and got.users == ["1"]


# --- bad input: exit status 2 and a line that names the problem ------------------------


def test_missing_files_and_unknown_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "items.json").write_text("{}")
    rc, lines = _train(capsys, tmp_path / "nope.csv", tmp_path / "items.json")
    assert rc == 2
    _one(lines, "nope.csv", "no such file")
    _one(lines, "items.json", "unknown format .json", ".csv, .csv.gz or .parquet")


def test_empty_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, items = _write(tmp_path, "", "item_id,text\n")
    rc, lines = _train(capsys, inter, items)
    assert rc == 2
    _one(lines, "interactions.csv", "empty file")
    _one(lines, "items.csv", "a header but no rows")


def test_missing_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, items = _write(tmp_path, "user_id,Item_ID,time\nu,1,1\n", "item_id,title\n1,x\n")
    rc, lines = _train(capsys, inter, items)
    assert rc == 2
    _one(lines, "interactions.csv", "column item_id is missing", "rename 'Item_ID' to 'item_id'")
    _one(lines, "interactions.csv", "column timestamp is missing")
    _one(lines, "items.csv", "column text is missing", "add a column named 'text'")


@pytest.mark.parametrize(
    ("rows", "lines_with"),
    [
        pytest.param(
            "u3,7,yesterday\nu3,7,\n",
            [
                ("line 8", "column timestamp", "'yesterday'", "epoch seconds", "ISO 8601"),
                ("line 9", "column timestamp", "no timestamp"),
            ],
            id="unreadable timestamp",
        ),
        pytest.param(
            "u3,042,1\nu3,x1,2\nu3,042,3\n",
            [
                (
                    "column item_id",
                    "not in",
                    "3 interactions name 2 items",
                    "'042' (line 8)",
                    "'x1' (line 9)",
                ),
            ],
            id="unknown items counted with the first ids",
        ),
        # One cell more would make pandas read the first column as an index, quietly.
        pytest.param(
            "u3,7,1,extra\n",
            [("line 8", "4 cells where the header has 3")],
            id="more cells than the header",
        ),
    ],
)
def test_bad_interaction_rows_name_their_line(
    rows: str, lines_with: list[tuple[str, ...]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    rc, lines = _train(capsys, *_write(tmp_path, INTERACTIONS + rows))
    assert rc == 2
    for parts in lines_with:
        _one(lines, "interactions.csv", *parts)


def test_duplicated_item_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines = _train(capsys, *_write(tmp_path, items=ITEMS + "42,again,,\n"))
    assert rc == 2
    _one(lines, "items.csv", "line 5", "column item_id", "'42' again (first at line 3)")


def test_empty_long_and_broken_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_id = "x" * 129
    # A quoted cell that spans two lines: the line numbers after it still count right.
    items = ITEMS + '8,"two\nlines",,\n,no id,,\n' + f"{long_id},long,,\n" + '"a\rb",cr,,\n'
    inter = INTERACTIONS + ",7,1\n"
    rc, lines = _train(capsys, *_write(tmp_path, inter, items))
    assert rc == 2
    _one(lines, "items.csv", "line 7", "column item_id", "empty id")
    _one(lines, "items.csv", "line 8", "column item_id", "129 characters long")
    _one(lines, "items.csv", "line 9", "column item_id", "line break")
    _one(lines, "interactions.csv", "line 8", "column user_id", "empty id")


def test_many_bad_rows_give_a_few_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = INTERACTIONS + "".join(f"u9,7,never{i}\n" for i in range(50))
    rc, lines = _train(capsys, *_write(tmp_path, bad))
    assert rc == 2 and len(lines) == 6
    assert "45 more rows like these" in lines[-1]


def test_a_float_id_column_in_parquet_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    pd.DataFrame({"item_id": [42.0, 7.0], "text": ["a", "b"]}).to_parquet(tmp_path / "i.parquet")
    inter, _ = _write(tmp_path)
    rc, lines = _train(capsys, inter, tmp_path / "i.parquet")
    assert rc == 2
    _one(lines, "i.parquet", "column item_id has type double")


def test_short_users_are_left_out_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inter = INTERACTIONS + "u3,7,1\nu3,42,2\n"
    lines: list[str] = []
    ds = read_dataset(*_write(tmp_path, inter), say=lines.append)
    assert ds.users == ["u1", "u2"]
    assert any(
        "1 users with fewer than 3 interactions left out (2 interactions)" in x for x in lines
    )
    rc, err = _train(capsys, *_write(tmp_path / "short", "user_id,item_id,timestamp\nu,7,1\n"))
    assert rc == 2
    _one(err, "interactions.csv", "no user has 3 or more interactions")


def test_other_interaction_columns_are_ignored_and_said(tmp_path: Path) -> None:
    inter = "user_id,item_id,timestamp,rating,note\nu,7,1,5,x\nu,42,2,4,y\nu,00042,3,3,z\n"
    lines: list[str] = []
    read_dataset(*_write(tmp_path, inter), say=lines.append)
    assert any("columns rating, note are ignored" in x for x in lines)


def test_bad_data_through_the_rerank_command(tmp_path: Path) -> None:
    """The real entry point: status 2, the lines on stderr, no traceback, no models dir."""
    inter, items = _write(tmp_path, INTERACTIONS + "u3,999,1\n")
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "app.cli", "train", "--interactions", str(inter),
           "--items", str(items), "--models-dir", str(models)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "'999' (line 8)" in done.stderr
    assert not models.exists()


def test_existing_version_is_refused_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "models" / "v1").mkdir(parents=True)
    rc, lines = _train(capsys, *_write(tmp_path), "--models-dir", str(tmp_path / "models"),
                       "--version", "v1")  # fmt: skip
    assert rc == 2
    _one(lines, "v1 exists")


# --- end to end ---------------------------------------------------------------------------


def _small_config(args: Any) -> Any:
    from training.fusion import ChannelParams
    from training.pipeline import PipelineConfig
    from training.sasrec import SASRecConfig
    from training.train import TrainConfig

    sasrec = SASRecConfig(history_len=6, dim=8, n_layers=1, n_heads=1, max_epochs=2, threads=1)
    return PipelineConfig(
        n_candidates=10, history_len=6, dim=8, n_layers=1, n_heads=2, hidden=16,
        use_text=False, als_factors=8, lists_per_user=10, seed=args.seed, channel_depth=20,
        fused_holdout=3, channel_params=ChannelParams(sasrec=sasrec),
        train=TrainConfig(epochs=1, batch_size=64, seed=args.seed, average_last=0),
    )  # fmt: skip


def test_data_synthetic_then_train_then_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "synthetic"
    assert cli.main(["data", "synthetic", "--users", "40", "--items", "30", "--length", "8",
                     "--out", str(data)]) == 0  # fmt: skip
    header = (data / "items.csv").read_text().splitlines()[0]
    assert header == "item_id,text,genres,year"
    monkeypatch.setattr(cli, "_pipeline_config", _small_config)
    models = tmp_path / "models"
    rc, _ = _train(capsys, data / "interactions.csv", data / "items.csv",
                   "--models-dir", str(models), "--version", "v1", "--default")  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in models.iterdir()) == ["DEFAULT", "v1"]
    manifest = json.loads((models / "v1" / "manifest.json").read_text())
    assert manifest["dataset"] == "synthetic"
    assert manifest["data"]["items"] == str(data / "items.csv")
    assert manifest["model_config"]["n_attrs"] > 0 and manifest["model_config"]["n_stats"] == 4
    inputs = ["hist", "hist_mask", "cand", "cand_mask", "cand_rank", "cand_feats"]
    assert manifest["inputs"] == inputs and len(manifest["candidate_features"]) == 10
    assert (models / "v1" / "item_ids.txt").read_text().splitlines()[0] == "1000"
    # eval finds the files through the manifest
    assert cli.main(["eval", str(models / "v1")]) == 0
    assert "scored_by" in json.loads((models / "v1" / "report.json").read_text())


def test_a_failed_run_leaves_no_models_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.pipeline

    def boom(*_: Any, **__: Any) -> Path:
        (tmp_path / "models").mkdir()  # as export_model does before it fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(training.pipeline, "run", boom)
    monkeypatch.setattr(cli, "_pipeline_config", _small_config)
    with pytest.raises(RuntimeError):
        _train(capsys, *_write(tmp_path), "--models-dir", str(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


# --- the command line without PyTorch -------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["--help"], ["data", "--help"], ["data", "synthetic", "--help"], ["train", "--help"],
             ["eval", "--help"]]
)  # fmt: skip
def test_help_works_without_torch(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now fails\n"
        "from training import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage: rerank" in done.stdout


def test_the_budget_reaches_the_training_as_a_deadline(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """--max-minutes counts from the command's start: the pipeline gets the instant."""
    import time

    import training.pipeline

    seen: dict[str, float] = {}

    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["deadline"] = args[5]
        raise SystemExit(0)

    monkeypatch.setattr(training.pipeline, "run", run)
    inter, items = _write(tmp_path / "data")
    before = time.monotonic()
    with pytest.raises(SystemExit):
        cli.main(["train", "--interactions", str(inter), "--items", str(items),
                  "--models-dir", str(tmp_path / "m"), "--max-minutes", "2"])  # fmt: skip
    assert before + 120 <= seen["deadline"] <= time.monotonic() + 120


def test_awkward_but_valid_csv(tmp_path: Path) -> None:
    """A byte-order mark, CRLF line ends, ids with spaces, accents and "NA", a text cell
    that spans lines: all read as written."""
    inter = "\ufeffuser_id,item_id,timestamp\r\nu 1,a b,1\r\nu 1,é,2\r\nu 1,NA,3\r\n"
    items = 'item_id,text\r\na b,x\r\né,\r\nNA,"multi\r\nline"\r\n'
    folder = tmp_path / "awk"
    folder.mkdir()
    (folder / "interactions.csv").write_bytes(inter.encode())
    (folder / "items.csv").write_bytes(items.encode())
    ds = read_dataset(folder / "interactions.csv", folder / "items.csv", say=None)
    assert ds.item_ids == ["a b", "é", "NA"] and ds.users == ["u 1"]
    assert ds.sequences[0].tolist() == [1, 2, 3]


def test_train_without_the_training_extra_says_so(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from training import cli\n"
        f"sys.exit(cli.main(['train', '--interactions', {str(tmp_path / 'i.csv')!r}, "
        f"'--items', {str(tmp_path / 'x.csv')!r}]))\n"
    )
    _write(tmp_path)
    (tmp_path / "interactions.csv").rename(tmp_path / "i.csv")
    (tmp_path / "items.csv").rename(tmp_path / "x.csv")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "needs the training extra" in done.stderr and "Traceback" not in done.stderr
