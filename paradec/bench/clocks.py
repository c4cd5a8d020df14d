"""The two clocks of the benchmark: every duration is measured on both, ratios use one.

Invariant: a timing pair is ``(wall seconds, process CPU seconds)`` of the same interval, and
garbage from earlier work is collected before a clock starts.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

WALL, CPU = 0, 1  # indices into a timing pair (wall seconds, process CPU seconds)


def resolve_clock(clock: str, threads: int) -> str:
    """``auto``: process CPU time with one thread (other processes on a shared machine then
    cannot skew a ratio by taking the core away), wall time with several (CPU time would add
    up the threads)."""
    if clock == "auto":
        return "cpu" if threads == 1 else "wall"
    return clock


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = now()
    return wall - start[WALL], cpu - start[CPU]


def timed(fn: Callable[[], object]) -> tuple[tuple[float, float], object]:
    """``((wall_s, cpu_s), fn())``; garbage from earlier work is collected before the clock."""
    gc.collect()
    start = now()
    out = fn()
    return since(start), out


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")
