"""Progress of the bench's phases on stderr, readable wherever it lands: a tqdm bar on a terminal that
reports its width; elsewhere (a pipe, a log file, CI, a terminal that reports no window size, where a bar
renders empty) one plain line when a phase starts and one when it ends."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized


def has_width(stream=None) -> bool:
    """True when `stream` (default stderr) is a terminal that reports a window of at least one column."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # no fileno (captured), not a terminal, closed
        return False


def steps(items: Iterable, desc: str, unit: str = "step") -> Iterator:
    """Yield `items`, showing progress as `desc` on stderr (a bar, or a start and an end line)."""
    if has_width():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, file=sys.stderr, mininterval=0.5, unit=unit)
        return
    n = f"{len(items)} {unit}s" if isinstance(items, Sized) else f"{unit}s"
    print(f"{desc}: {n} ...", file=sys.stderr, flush=True)
    t0, done = time.perf_counter(), 0
    for item in items:
        yield item
        done += 1
    print(f"{desc}: done, {done} {unit}s in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
