"""Small, self-contained speed measurements (the full decode benchmark is ``stage=bench``).

``python -m paradec.bench layout`` times :func:`paradec.layout.build_layout` on pre-tokenised
samples (default 8 samples x 16 branches x 256 tokens, one thread) and prints tokens/s.
Invariant: a figure printed here is measured in this process, median of repeats, warm-up excluded.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from .collator import ColumnarCollator, CollatorConfig
from .layout import Branch


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m paradec.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["layout"])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--branches", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rate = layout_throughput(args.samples, args.branches, args.tokens)
    print(f"build_layout: {args.samples} samples x {args.branches} branches x {args.tokens} tokens, "
          f"{args.threads} thread(s): {rate / 1e6:.2f}M tokens/s")


if __name__ == "__main__":
    main()
