"""Stopping the background loops that the lifespan starts (batcher, feedback writer, version
watcher): one way to cancel a loop and wait until it has ended."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_loop(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (None: never started) and wait for it; its cancellation is not an error."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
