"""Progress on the long steps, on stderr: a tqdm bar on a terminal, a few plain lines
otherwise (a log file gets no carriage returns), and each step's wall time."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Yield ``items``, showing how far along ``desc`` is."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False)
            return
    started = time.monotonic()
    marks = {max(1, total * q // 4) for q in (1, 2, 3)}  # 25%, 50%, 75%
    for i, item in enumerate(items, 1):
        yield item
        if i in marks:
            print(f"  {desc}: {i}/{total} ({time.monotonic() - started:.0f} s)", file=sys.stderr)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Print how long the step took (the scale runs read these lines)."""
    started = time.monotonic()
    yield
    print(f"step {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
