"""Memory of the columnar mask (dense bool vs FlexAttention BlockMask) and collator throughput.

Invariant: a figure printed here is measured in this process, median of repeats, warm-up excluded.
"""

from __future__ import annotations

import random
import statistics
import time

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
