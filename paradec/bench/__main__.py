"""``python -m paradec.bench layout``: the collator's throughput alone (the full benchmark is
``python run.py stage=bench``). Times :func:`paradec.layout.build_layout` with its grouping on
pre-tokenised samples (default 8 samples x 16 branches x 256 tokens, one thread)."""

from __future__ import annotations

import argparse

import torch

from .memory import layout_throughput


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
