"""CPU per request of the generator's client against httpx's, side by side, in one run.

    python -m loadtest.client_cost          # prints a table; docs/benchmark.md quotes it

Both drive a closed loop of ``CONNECTIONS`` callers for ``SECONDS`` against the same server:
a bare asyncio one in a child process that answers every request with the same bytes, so the
server costs next to nothing and the figure is the client's own CPU (its event loop's
thread) per answered request. The arms alternate, ``ROUNDS`` times each.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import uvloop

from app.embedded import free_port
from loadtest import load

CONNECTIONS = 16
SECONDS = 3.0
ROUNDS = 3
BODY = json.dumps({"user_id": "u1", "candidates": [str(i) for i in range(100)], "k": 10}).encode()

SERVER = """
import asyncio, sys, uvloop
ANSWER = (b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: 600"
          b"\\r\\n\\r\\n" + b"x" * 600)
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, d):
        self.buf += d
        while (end := self.buf.find(b"\\r\\n\\r\\n")) >= 0:
            n = int(self.buf[:end].lower().split(b"content-length: ")[1].split(b"\\r\\n")[0])
            if len(self.buf) < end + 4 + n: return
            self.buf = self.buf[end + 4 + n:]
            self.t.write(ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""


async def with_load(port: int) -> tuple[int, float]:
    run = await load.closed_loop(port, [load.render(port, "POST", "/rerank", BODY)], CONNECTIONS,
                                 SECONDS)  # fmt: skip
    return int(run.ok.sum()), run.cpu_s


async def with_httpx(port: int) -> tuple[int, float]:
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    headers = {"content-type": "application/json"}
    ok = 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        load.freeze_heap()
        end = time.perf_counter() + SECONDS
        cpu0 = time.thread_time()

        async def caller() -> None:
            nonlocal ok
            while time.perf_counter() < end:
                response = await client.post("/rerank", content=BODY, headers=headers)
                ok += response.status_code == 200

        await asyncio.gather(*(caller() for _ in range(CONNECTIONS)))
        return ok, time.thread_time() - cpu0


def main() -> int:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        while load.get(port, "/")[0] != 200:
            time.sleep(0.1)
        print(f"closed loop, {CONNECTIONS} connections, {SECONDS:g} s a round")
        print("| client | round | answers/s | client CPU us/request |\n|---|---|---|---|")
        for r in range(ROUNDS):
            for name, arm in (("loadtest.load", with_load), ("httpx", with_httpx)):
                ok, cpu = uvloop.run(arm(port))
                print(f"| {name} | {r + 1} | {ok / SECONDS:.0f} | {1e6 * cpu / ok:.0f} |")
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
