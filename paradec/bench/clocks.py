"""The two clocks of the benchmark: every duration is measured on both, ratios use one.

Invariant: a timing pair is ``(wall seconds, process CPU seconds)`` of the same interval, and
garbage from earlier work is collected before a clock starts. On a GPU every reading waits for
the queued kernels first, so an interval holds the GPU work launched in it.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

WALL, CPU = 0, 1  # indices into a timing pair (wall seconds, process CPU seconds)


def resolve_clock(clock: str, threads: int, gpu: bool = False) -> str:
    """``auto``: process CPU time with one thread (other processes on a shared machine then
    cannot skew a ratio by taking the core away), wall time with several (CPU time would add
    up the threads) or on a GPU (whose work the process's CPU time does not count)."""
    if clock == "auto":
        return "cpu" if threads == 1 and not gpu else "wall"
    return clock


def now() -> tuple[float, float]:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
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
