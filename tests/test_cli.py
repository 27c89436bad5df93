"""The rerank command: load, serve with an embedded Redis, offline verbs, no torch import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import redis

from app import cli
from app.embedded import EmbeddedRedis
from contract import DEMO_FILE
from tests.conftest import DEMO_VERSION, VERSION_A, VERSION_B


def test_load(
    monkeypatch: pytest.MonkeyPatch, redis_server: EmbeddedRedis, prefix: str, model_dir: Path
) -> None:
    monkeypatch.setenv("RERANK_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RERANK_KEY_PREFIX", prefix)
    assert cli.main(["load", str(model_dir / VERSION_A)]) == 0
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get(f"{prefix}:active") == VERSION_A.encode()
    finally:
        client.close()


def test_load_needs_a_redis_url(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setenv("RERANK_REDIS_URL", "")
    assert cli.main(["load", str(model_dir / VERSION_A)]) == 2


def test_serve_without_redis_starts_one_with_the_default_model(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    monkeypatch.setenv("RERANK_REDIS_URL", "")  # restored afterwards, serve sets it
    monkeypatch.setenv("RERANK_MODEL_DIR", str(model_dir))
    seen: dict[str, Any] = {}

    def fake_run(target: str, **kwargs: Any) -> None:
        seen.update(kwargs, target=target)
        client = redis.Redis.from_url(os.environ["RERANK_REDIS_URL"])
        try:
            seen["active"] = client.get("rr:active")
        finally:
            client.close()

    monkeypatch.setattr("uvicorn.run", fake_run)
    assert cli.main(["serve", "--port", "8123", "--workers", "2"]) == 0
    assert seen["target"] == "app.main:app"
    assert (seen["port"], seen["workers"], seen["loop"], seen["http"]) == (
        8123,
        2,
        "uvloop",
        "app.protocol:BoundedHttpTools",
    )
    assert seen["active"] == VERSION_B.encode()  # the newest folder: no models/DEFAULT here


def test_sigterm_stops_the_embedded_redis_too(model_dir: Path) -> None:
    """uvicorn re-raises SIGTERM after its shutdown; the embedded Redis must not outlive it."""
    import re
    import signal
    import time

    from app.embedded import free_port

    env = {k: v for k, v in os.environ.items() if k != "RERANK_REDIS_URL"}
    env.update(RERANK_MODEL_DIR=str(model_dir), RERANK_SHUTDOWN_DELAY_S="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"embedded Redis at (redis://\S+)", line)
        url = found.group(1) if found else None
    assert url, "rerank serve did not report its embedded Redis"
    time.sleep(1.0)  # let uvicorn install its own signal handlers
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()


def test_offline_verbs_go_to_training_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    fake = types.ModuleType("training.cli")
    fake.main = lambda argv: calls.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "training.cli", fake)
    assert cli.main(["train", "--epochs", "1"]) == 0
    assert calls == [["train", "--epochs", "1"]]


def test_the_service_never_imports_torch_or_training() -> None:
    code = (
        "import sys, app.main, app.cli\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('training')]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "RERANK_REDIS_URL": "redis://127.0.0.1:1/0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# Run in a subprocess where `import torch` fails, as on a machine without the training extra.
WITHOUT_TORCH = """
import sys
from importlib.abc import MetaPathFinder

class NoTorch(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
from app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verb", ["data", "train", "eval", "demo-sample"])
def test_offline_help_works_without_torch(verb: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, verb, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: rerank {verb}" in done.stdout


def test_training_without_torch_says_what_to_install(tmp_path: Path) -> None:
    rows = "\n".join(f"u{u},i{i},{u * 10 + i}" for u in range(4) for i in range(5))
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\n" + rows + "\n")
    items = "\n".join(f"i{i},film {i}" for i in range(5))
    (tmp_path / "items.csv").write_text("item_id,text\n" + items + "\n")
    files = ["--interactions", str(tmp_path / "interactions.csv")]
    files += ["--items", str(tmp_path / "items.csv"), "--models-dir", str(tmp_path / "models")]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "train", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "needs the training extra" in done.stderr and "Traceback" not in done.stderr


def test_demo_sample_from_files_without_torch(tmp_path: Path, demo_models: Path) -> None:
    """`rerank demo-sample` on the files a model was trained on, where `import torch` fails:
    the demo page's sample needs only the demo extra."""
    model = tmp_path / "models" / DEMO_VERSION
    shutil.copytree(demo_models / DEMO_VERSION, model)
    (model / DEMO_FILE).unlink()

    def rerank(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )

    files = tmp_path / "files"
    # The data set of the demo model (tests/conftest.py: demo_dataset), as the two files.
    made = rerank("data", "synthetic", "--users", "40", "--items", "200", "--length", "30",
                  "--seed", "0", "--out", str(files))  # fmt: skip
    assert made.returncode == 0, made.stderr
    data = ["--interactions", str(files / "interactions.csv"), "--items", str(files / "items.csv")]
    done = rerank("demo-sample", "--model", str(model), *data)
    assert done.returncode == 0, done.stderr
    assert f"wrote {model / DEMO_FILE}" in done.stdout
    sample = json.loads((model / DEMO_FILE).read_text())
    expected = json.loads((demo_models / DEMO_VERSION / DEMO_FILE).read_text())
    assert sample["users"] == expected["users"] and sample["items"] == expected["items"]

    chosen = rerank("demo-sample", "--model", str(model), *data, "--users", "5,2")
    assert chosen.returncode == 0, chosen.stderr
    assert [u["user_id"] for u in json.loads((model / DEMO_FILE).read_text())["users"]] == [
        "5",
        "2",
    ]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--model", "{tmp}/nothing"], "no manifest.json"),
        (["--model", "{model}", "--interactions", "{tmp}/i.csv"], "go together"),
        (["--model", "{model}", "--files", "--users", "nobody"], "not users of"),
        (["--model", "{other}", "--files"], "have no vector"),
    ],
    ids=["no-model", "half-the-files", "unknown-user", "other-items"],
)
def test_demo_sample_bad_arguments_are_one_line(
    argv: list[str],
    says: str,
    tmp_path: Path,
    demo_models: Path,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from training.cli import main as training_main
    from training.data import synthetic_tables
    from training.files import write_files

    files = write_files(tmp_path / "files", *synthetic_tables(40, 200, 30, seed=0))
    words: list[str] = []
    for word in argv:
        if word == "--files":
            words += ["--interactions", str(files[0]), "--items", str(files[1])]
        else:
            words.append(
                word.format(
                    tmp=tmp_path, model=demo_models / DEMO_VERSION, other=model_dir / VERSION_A
                )
            )
    assert training_main(["demo-sample", *words]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_serve_uses_the_embedded_port_setting_and_logs_the_url(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from app.embedded import free_port

    port = free_port()
    monkeypatch.setenv("RERANK_REDIS_URL", "")
    monkeypatch.setenv("RERANK_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("RERANK_EMBEDDED_REDIS_PORT", str(port))
    seen: dict[str, Any] = {}
    monkeypatch.setattr("uvicorn.run", lambda target, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)  # keep caplog's handler
    with caplog.at_level("INFO", logger="rerank"):
        assert cli.main(["serve", "--port", "8123"]) == 0
    url = f"redis://127.0.0.1:{port}/0"
    assert os.environ["RERANK_REDIS_URL"] == url
    assert f"RERANK_REDIS_URL={url} rerank load" in caplog.text
    assert seen["log_config"] is None  # uvicorn's own lines go through app/logs.py
    assert seen["proxy_headers"] is False  # no per-request layer for an address nobody reads
