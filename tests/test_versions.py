"""The version verbs: versions, activate, drop, split, load --as; refused input changes nothing.

Every refusal is checked the same way: exit status 2, one line on stderr that names the
offending version or share, and every key under the test's prefix byte for byte as before.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from app import cli
from app.embedded import EmbeddedRedis
from app.loader import load_into_redis
from tests.conftest import N_ITEMS, VERSION_A, VERSION_B


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_server: EmbeddedRedis, prefix: str) -> Iterator[str]:
    monkeypatch.setenv("RERANK_REDIS_URL", redis_server.url)
    monkeypatch.setenv("RERANK_KEY_PREFIX", prefix)
    monkeypatch.setenv("RERANK_LOG_FORMAT", "text")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield prefix
    root.handlers, root.level = handlers, level  # cli.main points them at capsys's stderr


@pytest.fixture
def two(redis_server: EmbeddedRedis, env: str, model_dir: Path) -> str:
    """A active, B loaded; returns the prefix."""
    load_into_redis(redis_server.url, model_dir / VERSION_A, env)
    load_into_redis(redis_server.url, model_dir / VERSION_B, env, activate=False)
    return env


@pytest.fixture
def load_b_as(two: str, redis_server: EmbeddedRedis, model_dir: Path) -> Callable[..., None]:
    """Loads B again under each name given, none of them active."""

    def load(*names: str) -> None:
        for name in names:
            load_into_redis(redis_server.url, model_dir / VERSION_B, two, activate=False, name=name)

    return load


def snapshot(r: redis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    return {key: r.dump(key) for key in r.scan_iter(f"{prefix}:*", count=1000)}


def refused(
    argv: list[str], r: redis.Redis, prefix: str, capsys: pytest.CaptureFixture[str]
) -> str:
    """Run a command that must be refused; return its one line of error."""
    before = snapshot(r, prefix)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert snapshot(r, prefix) == before, "a refused command changed Redis"
    return err[0]


def test_versions_lists_active_loaded_and_split(
    two: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["split", f"{VERSION_A}=70", f"{VERSION_B}=30"]) == 0
    capsys.readouterr()
    assert cli.main(["versions", "--json"]) == 0
    listed = {v["version"]: v for v in json.loads(capsys.readouterr().out)}
    assert set(listed) == {VERSION_A, VERSION_B}
    assert listed[VERSION_A]["active"] and listed[VERSION_A]["share"] == 70
    assert not listed[VERSION_B]["active"] and listed[VERSION_B]["share"] == 30
    assert all(v["loaded"] and v["loaded_at"] for v in listed.values())
    assert cli.main(["versions"]) == 0
    text = capsys.readouterr().out
    assert f"{VERSION_A}" in text and "active 70%" in text and "30%" in text


def test_activate_and_roll_back(two: str, r: redis.Redis) -> None:
    assert cli.main(["activate", VERSION_B]) == 0
    assert r.get(f"{two}:active") == VERSION_B.encode()
    assert cli.main(["activate", VERSION_A]) == 0  # the rollback
    assert r.get(f"{two}:active") == VERSION_A.encode()


def test_activate_refuses_an_unknown_version(
    two: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(["activate", "nope"], r, two, capsys)
    assert "nope" in line and "not loaded" in line


def test_split_refuses_shares_that_do_not_sum_to_100(
    two: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(["split", f"{VERSION_A}=50", f"{VERSION_B}=40"], r, two, capsys)
    assert "sum to 90, not 100" in line


@pytest.mark.parametrize("share", ["abc", "0", "101", "50.5", ""])
def test_split_refuses_a_share_that_is_no_whole_percent(
    two: str, r: redis.Redis, capsys: pytest.CaptureFixture[str], share: str
) -> None:
    line = refused(["split", f"{VERSION_A}={share}", f"{VERSION_B}=50"], r, two, capsys)
    assert f"share of {VERSION_A}" in line


def test_split_refuses_an_unknown_or_unloaded_version(
    two: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(["split", f"{VERSION_A}=50", "ghost=50"], r, two, capsys)
    assert "version ghost is not loaded" in line
    line = refused(["split", f"{VERSION_A}=100", "noequals"], r, two, capsys)
    assert "'noequals' is not VERSION=PERCENT" in line


def test_split_refuses_a_fourth_live_version(
    two: str, r: redis.Redis, load_b_as: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    load_b_as("c", "d", "e")
    # Three in the split besides the active A: four live.
    line = refused(["split", "c=40", "d=30", "e=30"], r, two, capsys)
    assert "4 live versions" in line and "at most 3" in line
    line = refused(["split", "c=25", "d=25", "e=25", f"{VERSION_A}=25"], r, two, capsys)
    assert "4 versions" in line and "at most 3" in line
    # With A among them, three are live: allowed; then activating a fourth is refused.
    assert cli.main(["split", "c=40", "d=30", f"{VERSION_A}=30"]) == 0
    line = refused(["activate", "e"], r, two, capsys)
    assert "activating e would make 4 live versions" in line


def test_split_clear_and_show(two: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["split", f"{VERSION_A}=50", f"{VERSION_B}=50"]) == 0
    raw = r.get(f"{two}:split")
    assert raw is not None
    assert json.loads(raw) == {"shares": [[VERSION_A, 50], [VERSION_B, 50]]}
    capsys.readouterr()
    assert cli.main(["split"]) == 0
    assert f"{VERSION_A}=50 {VERSION_B}=50" in capsys.readouterr().out
    assert cli.main(["split", "--clear"]) == 0
    assert r.get(f"{two}:split") is None


def test_drop_refuses_a_live_version(
    two: str, r: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(["drop", VERSION_A, "--grace-s", "0"], r, two, capsys)
    assert f"version {VERSION_A} is live (active)" in line
    assert cli.main(["split", f"{VERSION_A}=50", f"{VERSION_B}=50"]) == 0
    line = refused(["drop", VERSION_B, "--grace-s", "0"], r, two, capsys)
    assert f"version {VERSION_B} is live (in the split" in line
    line = refused(["drop", "ghost", "--grace-s", "0"], r, two, capsys)
    assert "version ghost is not loaded" in line


def test_drop_deletes_every_key_of_the_version_in_batches(
    two: str, r: redis.Redis, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import versions
    from app.store import Keys

    r.hset(f"{two}:ab:{VERSION_B}", "impressions", 3)
    unlinked: list[int] = []
    original = versions._unlink

    def counted(client: redis.Redis, chunk: list[bytes]) -> int:
        unlinked.append(len(chunk))
        return original(client, chunk)

    monkeypatch.setattr(versions, "_unlink", counted)
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert versions.drop(client, Keys(two), VERSION_B, batch=64) == N_ITEMS
    finally:
        client.close()
    assert max(unlinked) <= 64 and sum(unlinked) == N_ITEMS
    assert not list(r.scan_iter(f"{two}:*{VERSION_B}*"))
    assert r.hget(f"{two}:versions", VERSION_B) is None
    # The other version is untouched.
    assert len(list(r.scan_iter(f"{two}:v:{VERSION_A}:*", count=1000))) == N_ITEMS
    assert r.get(f"{two}:m:{VERSION_A}") is not None


def test_drop_through_the_cli(two: str, r: redis.Redis) -> None:
    assert cli.main(["drop", VERSION_B, "--grace-s", "0"]) == 0
    assert not list(r.scan_iter(f"{two}:v:{VERSION_B}:*", count=1000))
    assert r.get(f"{two}:m:{VERSION_B}") is None


def test_load_as_another_name(
    env: str, r: redis.Redis, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["load", str(model_dir / VERSION_A), "--as", "copy-1", "--no-activate"]) == 0
    manifest = json.loads(r.get(f"{env}:m:copy-1") or b"")
    assert manifest["version"] == "copy-1" and manifest["artifact"] == VERSION_A
    local = json.loads((model_dir / VERSION_A / "manifest.json").read_text())
    assert manifest["sha256"] == local["sha256"]
    assert len(list(r.scan_iter(f"{env}:v:copy-1:*", count=1000))) == N_ITEMS
    assert not list(r.scan_iter(f"{env}:v:{VERSION_A}:*"))  # only under the new name
    assert json.loads(r.hget(f"{env}:versions", "copy-1") or b"")["artifact"] == VERSION_A
    assert r.get(f"{env}:active") is None


def test_load_as_still_verifies_the_folder(
    env: str, r: redis.Redis, model_dir: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(model_dir / VERSION_A, tmp_path / VERSION_A))
    with (folder / "model.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    assert cli.main(["load", str(folder), "--as", "copy-2"]) == 1
    assert not list(r.scan_iter(f"{env}:*"))


def test_load_as_refuses_a_bad_name(
    env: str, r: redis.Redis, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = refused(["load", str(model_dir / VERSION_A), "--as", "a/b"], r, env, capsys)
    assert "--as 'a/b'" in line


def test_load_refuses_to_activate_a_fourth_live_version(
    two: str,
    r: redis.Redis,
    load_b_as: Callable[..., None],
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    load_b_as("c", "d")
    assert cli.main(["split", "c=40", "d=30", f"{VERSION_A}=30"]) == 0  # three live
    line = refused(["load", str(model_dir / VERSION_B), "--as", "e"], r, two, capsys)
    assert "activating e would make 4 live versions" in line
