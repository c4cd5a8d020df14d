"""Memory of the columnar mask (dense bool vs FlexAttention BlockMask), the peak resident memory
of a step, and the collator's throughput.

Invariant: a figure printed here is measured in this process, median of repeats, warm-up excluded;
a peak is the process's resident set high-water mark, reset right before the measured work.
"""

from __future__ import annotations

import ctypes
import gc
import random
import statistics
import time
from typing import Optional

import torch

from ..collator import ColumnarCollator
from ..config import BenchConfig, CollatorConfig
from ..layout import Branch, BranchSample, build_layout
from ..masks import columnar_mask, flex_block_mask
from .clocks import timed


def _block_mask_bytes(block_mask) -> int:
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
             "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    tensors = [getattr(block_mask, n, None) for n in names]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def bench_masks(cfg: BenchConfig) -> list[dict]:
    """Memory of the dense columnar mask vs the FlexAttention BlockMask at each length L.

    The layout of length L: a background of L/4 tokens and 8 branches sharing the rest.
    """
    out = []
    for L in [int(n) for n in cfg.mask_lengths]:
        bg = L // 4
        k = max(1, min(8, L - bg))
        per, extra = divmod(L - bg, k)
        sample = BranchSample(list(range(bg)), [Branch([], [0] * (per + (i < extra)))
                                                for i in range(k)])
        layout = build_layout([sample])
        (build_s, _), dense = timed(lambda: columnar_mask(layout.column, layout.valid))
        row = {"length": L, "dense_bool_bytes": dense.numel() * dense.element_size(),
               "dense_float32_bytes": dense.numel() * 4, "dense_build_s": build_s,
               "flex_bytes": None, "flex_build_s": None, "flex_sparsity": None, "flex_error": None}
        del dense
        if cfg.flex:
            try:
                flex_block_mask(layout.column, layout.valid)  # first call imports and warms up
                (flex_s, _), block = timed(lambda: flex_block_mask(layout.column,
                                                                    layout.valid))
                row.update(flex_bytes=_block_mask_bytes(block), flex_build_s=flex_s,
                           flex_sparsity=float(block.sparsity()),
                           flex_block_size=list(block.BLOCK_SIZE))
            except Exception as err:  # noqa: BLE001 - report why flex is unusable here
                row["flex_error"] = f"{type(err).__name__}: {err}"
        out.append(row)
    return out


def layout_throughput(samples: int = 8, branches: int = 16, tokens: int = 256, repeats: int = 30,
                      vocab: int = 6400, seed: int = 0) -> float:
    """Tokens per second of the collator (grouping + build_layout) on random branches."""
    rng = random.Random(seed)
    items = [Branch(prompt=[], target=[rng.randrange(vocab) for _ in range(tokens)])
             for _ in range(samples * branches)]
    collate = ColumnarCollator(CollatorConfig(branches_per_sample=branches))
    for _ in range(3):  # warm-up
        collate(items)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        collate(items)
        times.append(time.perf_counter() - start)
    return samples * branches * tokens / statistics.median(times)


# --- peak resident memory of one step (Linux: /proc/self) ---------------------------------------

def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def start_peak_rss() -> Optional[int]:
    """Return freed memory to the OS, reset the peak resident set size to the current one, and
    return that (bytes); None where the kernel cannot reset it (not Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed small blocks otherwise
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
    except OSError:
        return None
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss() -> Optional[int]:
    """The peak resident set size (bytes) since :func:`start_peak_rss`."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024
