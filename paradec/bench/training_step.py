"""One columnar training step against one plain causal (``is_causal``) step on the same tokens, at
each length of ``bench.train_lengths``: time and peak resident memory.

Invariant: both sides run forward, loss, backward and an AdamW step (lr 0, so the weights stay)
on the same model and tokens, alternating which goes first, after a warm-up of each (which also
allocates the optimizer state); the time ratio is the median of the repeat-by-repeat pairs. A
step's peak memory is the process's resident high-water mark during it (reset right before), so
it includes the model, its gradients and the optimizer state that both sides hold. Both sides
project every position onto the vocabulary, so the ratio isolates what the columnar mask and 2D
RoPE cost (the training loop's :func:`paradec.training.labelled_loss` also skips unlabelled
positions, a saving that depends on the task, not on the layout).
"""

from __future__ import annotations

import random

import torch

from .. import models
from ..config import BenchConfig
from ..layout import IGNORE_INDEX, Branch, BranchSample, build_layout
from ..loss import columnar_loss
from .clocks import CPU, WALL, median, now, since
from .memory import peak_rss, start_peak_rss


def training_sample(length: int, branches: int, vocab: int, seed: int) -> BranchSample:
    """A pretraining sample of ``length`` tokens: a background of a quarter of them and
    ``branches`` branches of target tokens sharing the rest."""
    rng = random.Random(f"{seed}-{length}")
    draw = lambda n: [rng.randrange(2, vocab) for _ in range(n)]  # noqa: E731
    background = length // 4
    k = max(1, min(branches, length - background))
    per, extra = divmod(length - background, k)
    return BranchSample(draw(background), [Branch([], draw(per + (i < extra))) for i in range(k)])


def bench_training(model, cfg: BenchConfig, branch_stride: int, vocab: int, clock: str,
                   progress=None) -> list[dict]:
    """Columnar vs plain causal training step at each length: one row per length."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    was_training = model.training
    model.train()
    rows = []
    try:
        for length in [int(n) for n in cfg.train_lengths]:
            rows.append(_one_length(model, optimizer, cfg, length, branch_stride, vocab, clock))
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return rows


def _one_length(model, optimizer, cfg: BenchConfig, length: int, branch_stride: int, vocab: int,
                clock: str) -> dict:
    layout = build_layout([training_sample(length, cfg.train_branches, vocab, cfg.seed)],
                          branch_stride=branch_stride, loss_on="target").to(
        next(model.parameters()).device)
    ids = layout.input_ids
    causal_labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)), 1)

    def step(kind: str):
        """((wall, cpu) of the whole step, peak resident bytes during it, resident before)."""
        before = start_peak_rss()
        start = now()
        if kind == "columnar":  # the columnar mask is built inside, as in the training loop
            logits = models.forward_layout(model, layout).logits
            loss, _ = columnar_loss(logits, layout.labels)
        else:  # the unpatched call: no 4D mask, so sdpa runs is_causal attention
            logits = model(input_ids=ids).logits
            loss, _ = columnar_loss(logits, causal_labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        took = since(start)
        return took, peak_rss(), before

    for _ in range(max(cfg.warmup, 1)):
        step("columnar"), step("causal")
    times = {"columnar": [], "causal": []}
    for r in range(cfg.train_repeats):  # side by side, alternating which goes first
        for kind in (("columnar", "causal") if r % 2 == 0 else ("causal", "columnar")):
            times[kind].append(step(kind))
    c = CPU if clock == "cpu" else WALL
    med = lambda kind, k=c: median(t[0][k] for t in times[kind])  # noqa: E731
    ratio = lambda k=c: median(  # noqa: E731  paired, repeat by repeat
        a[0][k] / b[0][k] for a, b in zip(times["columnar"], times["causal"]))
    row = {"length": int(ids.shape[1]), "branches": int(layout.last_index.shape[1]),
           "clock": clock, "columnar_step_s": med("columnar"), "causal_step_s": med("causal"),
           "time_ratio": ratio(), "time_ratio_wall": ratio(WALL), "time_ratio_cpu": ratio(CPU),
           "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    peaks = {kind: [t[1] for t in times[kind]] for kind in times}
    if all(p is not None for kind in peaks for p in peaks[kind]):
        base = {kind: [t[2] for t in times[kind]] for kind in times}
        row.update(
            columnar_peak_rss=max(peaks["columnar"]), causal_peak_rss=max(peaks["causal"]),
            columnar_peak_increase=max(p - b for p, b in zip(peaks["columnar"],
                                                              base["columnar"])),
            causal_peak_increase=max(p - b for p, b in zip(peaks["causal"], base["causal"])))
        row["memory_ratio"] = row["columnar_peak_rss"] / row["causal_peak_rss"]
        row["increase_ratio"] = row["columnar_peak_increase"] / row["causal_peak_increase"]
    return row
