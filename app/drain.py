"""Graceful shutdown: on SIGTERM readiness turns false first, then the server drains.

uvicorn on SIGTERM stops accepting at once and waits for in-flight requests (up to its
``timeout_graceful_shutdown``). A load balancer still sending to the process in that moment
gets refused connections. So the lifespan puts this handler in front of uvicorn's: the first
SIGTERM (or SIGINT) only marks the process as draining, which makes /readyz answer 503 while
every request is still served; ``delay_s`` later uvicorn's own handler runs and the usual
graceful shutdown follows. A second signal skips the wait.

Signal handlers belong to the main thread: elsewhere (tests' TestClient) this does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Callable[[int, FrameType | None], Any]


class Drain:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.draining = False
        self._previous: dict[int, Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handed_over = False

    def install(self) -> None:
        """Wrap the server's SIGTERM/SIGINT handlers (call from the running lifespan)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            # Only in front of a server's own Python handler (uvicorn's handle_exit); the
            # default handlers would end the process without any drain anyway.
            if callable(previous) and previous is not signal.default_int_handler:
                self._previous[sig] = previous
                signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.delay_s == 0 or self._loop is None:
            self.draining = True
            self._hand_over(sig, frame)
            return
        self.draining = True
        log.info("signal %d: readiness off, stopping in %.1f s", sig, self.delay_s)
        loop = self._loop
        loop.call_soon_threadsafe(loop.call_later, self.delay_s, self._after_delay, sig, frame)

    def _after_delay(self, sig: int, frame: FrameType | None) -> None:
        if not self._handed_over:  # a second signal may have been faster
            self._hand_over(sig, frame)

    def _hand_over(self, sig: int, frame: FrameType | None) -> None:
        self._handed_over = True
        previous = self._previous.get(sig)
        if previous is not None:
            previous(sig, frame)
