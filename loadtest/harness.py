"""The service under test with its Redis: the one way bench, chaos and the tests start it.

A ``Harness`` owns a redis-server of its own (``app.embedded``), loads model versions into
it as ``rerank load`` does (``app.loader``), and starts servers against it: the service
(``rerank serve``) or any ASGI app under the same uvicorn (the peers). Each server is a child
process in its own session, awaited on ``/readyz``, stopped by its pid. ``read_metrics``
is the one reader of the service's ``/metrics``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from app.embedded import EmbeddedRedis, free_port
from app.loader import load_into_redis
from contract import Manifest
from loadtest import load

ROOT = Path(__file__).resolve().parents[1]


def relative(path: Path) -> str:
    """A path as the results files keep it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


class Server:
    """A server process: started in its own session, awaited on a URL, stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, logs: Path):
        self.name, self.port = name, port
        self.log_path = logs / f"{name}.log"
        with self.log_path.open("ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> bool:
        return load.get(self.port, "/readyz")[0] == 200

    def wait_ready(self, timeout_s: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_s:g}s: {self.tail()}")
            time.sleep(0.1)
        return self

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def workers(self) -> list[psutil.Process]:
        """The processes that serve requests: the children of a supervisor, else itself."""
        proc = psutil.Process(self.pid)
        serving = [p for p in proc.children(recursive=True) if p.memory_info().rss > 60e6]
        return serving or [proc]

    def rss_mb(self) -> list[float]:
        return [p.memory_info().rss / 1e6 for p in self.workers()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn stops its workers gracefully
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)  # its own session: only our children
                self.proc.wait()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes and all their children (workers)."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{name{label="value",...}: value}``, ``_created`` samples left out."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def read_metrics(port: int) -> dict[str, float]:
    """The service's /metrics, parsed."""
    _, body = await load.request(port, "GET", "/metrics")
    return parse_metrics(body.decode())


def metric_total(samples: dict[str, float], name: str) -> float:
    """The sum of a metric's samples over all their labels."""
    return sum(v for k, v in samples.items() if k.split("{", 1)[0] == name)


def service_cmd(port: int, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers)]  # fmt: skip


def uvicorn_cmd(target: str, port: int) -> list[str]:
    """An ASGI app under the service's own server stack (uvloop, httptools)."""
    return [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning"]  # fmt: skip


class Harness:
    """A redis-server of its own, the model versions loaded into it, servers against it."""

    def __init__(self, work: Path, prefix: str = "rr") -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.redis = EmbeddedRedis().start()
        self.servers: list[Server] = []

    @property
    def url(self) -> str:
        return self.redis.url

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def load(self, folder: Path, prefix: str | None = None) -> Manifest:
        """What ``rerank load`` does: vectors, then manifest, then the active pointer."""
        return load_into_redis(self.url, folder, prefix or self.prefix)

    def env(self, model_dir: Path, prefix: str | None = None, **settings: str) -> dict[str, str]:
        """The environment of a service on this Redis: RERANK_* settings over ours."""
        return {
            **os.environ,
            "RERANK_REDIS_URL": self.url,
            "RERANK_MODEL_DIR": str(model_dir),
            "RERANK_KEY_PREFIX": prefix or self.prefix,
            **settings,
        }

    def start(self, name: str, cmd: list[str], env: dict[str, str], port: int) -> Server:
        server = Server(name, cmd, env, port, self.logs)
        self.servers.append(server)
        try:
            return server.wait_ready()
        except BaseException:
            server.stop()
            raise

    @contextmanager
    def serving(
        self, name: str, env: dict[str, str], workers: int = 1, app: str | None = None
    ) -> Iterator[Server]:
        """The service (or the ASGI ``app``, a peer) on a free port, for the block's length."""
        port = free_port()
        cmd = uvicorn_cmd(app, port) if app else service_cmd(port, workers)
        server = self.start(name, cmd, env, port)
        try:
            yield server
        finally:
            server.stop()

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.redis.close()


@contextmanager
def harness(prefix: str = "rr", name: str = "rerank-load") -> Iterator[Harness]:
    """A Harness in a temporary folder; the folder (server logs) stays when the block fails."""
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    h = Harness(work, prefix)
    try:
        yield h
    except BaseException:
        print(f"failed; server logs kept in {h.logs}", file=sys.stderr)
        h.close()
        raise
    h.close()
    shutil.rmtree(work, ignore_errors=True)
