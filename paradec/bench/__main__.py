"""``python -m paradec.bench <probe>``: single measurements behind the full benchmark (which is
``python run.py stage=bench``), each on its own, one thread by default.

  layout     the collator's throughput: :func:`paradec.layout.build_layout` with its grouping on
             pre-tokenised samples (default 8 samples x 16 branches x 256 tokens)
  attention  one attention layer's forward + backward under the columnar mask of a training
             layout: transformers' sdpa with the dense mask, paradec's columnar sdpa, is_causal
  step       where the time of bare parallel decode steps goes (torch.profiler, top operators)
  matmul     how fast fp32 matmuls of a few rows stream a large weight
"""

from __future__ import annotations

import argparse

import torch

from . import probes
from .memory import layout_throughput


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m paradec.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="what", required=True)
    layout = sub.add_parser("layout", help="the collator's throughput")
    layout.add_argument("--samples", type=int, default=8)
    layout.add_argument("--branches", type=int, default=16)
    layout.add_argument("--tokens", type=int, default=256)
    attention = sub.add_parser("attention", help="one attention layer under the columnar mask")
    attention.add_argument("--length", type=int, default=4096)
    attention.add_argument("--heads", type=int, default=8)
    attention.add_argument("--kv-heads", type=int, default=2)
    step = sub.add_parser("step", help="a profile of bare parallel decode steps")
    step.add_argument("--model", default="minimind2_small",
                      help="a conf/model preset (a Hub preset: its checkpoint, or random weights "
                           "of its random_arch)")
    step.add_argument("--context", type=int, default=4096)
    step.add_argument("--branches", type=int, default=8)
    sub.add_parser("matmul", help="a few rows against a 4096 x 4096 fp32 weight")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    threads = f"{args.threads} thread(s)"
    if args.what == "layout":
        rate = layout_throughput(args.samples, args.branches, args.tokens)
        print(f"build_layout: {args.samples} samples x {args.branches} branches x {args.tokens} "
              f"tokens, {threads}: {rate / 1e6:.2f}M tokens/s")
    elif args.what == "attention":
        r = probes.attention_layer(args.length, args.heads, args.kv_heads)
        print(f"one attention layer, {r['length']} tokens, {args.heads}/{args.kv_heads} heads, "
              f"forward + backward, {threads}:\n"
              f"  transformers sdpa, dense columnar mask  {r['transformers_sdpa_dense_mask_s']:.3f} s\n"
              f"  paradec columnar sdpa, the same mask     {r['columnar_sdpa_s']:.3f} s\n"
              f"  transformers sdpa, is_causal             {r['is_causal_s']:.3f} s")
    elif args.what == "step":
        shares = probes.parallel_step_profile(args.model, args.context, args.branches)
        print(f"bare parallel decode steps, {args.model}, N={args.context}, K={args.branches}, "
              f"{threads}; share of CPU time:")
        for name, share in shares[:8]:
            print(f"  {100 * share:5.1f}%  {name}")
    else:
        print(f"F.linear against a 4096 x 4096 fp32 weight (64 MiB), {threads}:")
        for rows, rate in probes.matmul_streaming():
            print(f"  {rows:3d} rows: {rate / 1e9:.1f} GB/s of weights")


if __name__ == "__main__":
    main()
