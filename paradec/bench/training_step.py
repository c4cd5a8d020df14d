"""One columnar training step against one plain causal (``is_causal``) step on the same tokens.

Invariant: both sides run forward, loss, backward and an AdamW step (lr 0, so the weights stay)
on the same model and batch, alternating which goes first, and the ratio is the median of the
repeat-by-repeat pairs. Both project every position onto the vocabulary, so the ratio isolates
what the columnar mask and 2D RoPE cost (the training loop's
:func:`paradec.training.labelled_loss` also skips unlabelled positions, a saving that depends on
the task, not on the layout).
"""

from __future__ import annotations

import gc
import random

import torch

from .. import models
from ..config import BenchConfig
from ..layout import IGNORE_INDEX, Branch, BranchSample, build_layout
from ..loss import columnar_loss
from .clocks import CPU, WALL, median, now, since


def bench_training(model, cfg: BenchConfig, branch_stride: int, vocab: int,
                   clock: str) -> dict:
    """Columnar vs plain causal training step (forward, loss, backward, optimizer) on one batch."""
    rng = random.Random(cfg.seed + 1)
    draw = lambda n: [rng.randrange(2, vocab) for _ in range(n)]  # noqa: E731
    samples = [BranchSample(draw(cfg.train_background_tokens),
                            [Branch([], draw(cfg.train_branch_tokens))
                             for _ in range(cfg.train_branches)])
               for _ in range(cfg.train_batch)]
    layout = build_layout(samples, branch_stride=branch_stride, loss_on="target").to(
        next(model.parameters()).device)
    ids = layout.input_ids
    causal_labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)), 1)
    # lr 0: the optimizer does all its work but the weights stay as they were.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    was_training = model.training
    model.train()

    def step(kind: str):
        """((wall, cpu) of forward + loss + backward, (wall, cpu) of the whole step)."""
        gc.collect()
        start = now()
        if kind == "columnar":
            logits = models.forward_layout(model, layout).logits
            loss, _ = columnar_loss(logits, layout.labels)
        else:  # the unpatched call: no 4D mask, so sdpa runs is_causal attention
            logits = model(input_ids=ids).logits
            loss, _ = columnar_loss(logits, causal_labels)
        loss.backward()
        fwd_bwd = since(start)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return fwd_bwd, since(start)

    try:
        for _ in range(max(cfg.warmup, 1)):
            step("columnar"), step("causal")
        times = {"columnar": [], "causal": []}
        for r in range(cfg.train_repeats):  # side by side, alternating which goes first
            for kind in (("columnar", "causal") if r % 2 == 0 else ("causal", "columnar")):
                times[kind].append(step(kind))
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    c = CPU if clock == "cpu" else WALL
    med = lambda kind, part, k=c: median(t[part][k] for t in times[kind])  # noqa: E731
    ratio = lambda part, k=c: median(  # noqa: E731  paired, repeat by repeat
        a[part][k] / b[part][k] for a, b in zip(times["columnar"], times["causal"]))
    return {
        "tokens": int(ids.numel()), "batch": int(ids.shape[0]), "length": int(ids.shape[1]),
        "clock": clock,
        "columnar_step_s": med("columnar", 1), "causal_step_s": med("causal", 1),
        "columnar_fwd_bwd_s": med("columnar", 0), "causal_fwd_bwd_s": med("causal", 0),
        "train_overhead": ratio(1), "train_overhead_fwd_bwd": ratio(0),
        "train_overhead_wall": ratio(1, WALL), "train_overhead_cpu": ratio(1, CPU),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
