"""The decoding benchmark: a random token workload, each mode timed on it, and the limit.

Invariant: every mode decodes the same questions with the same settings through the evaluation's
own dispatch (:func:`paradec.evaluation.run_mode`: one context per call for the modes that batch
a context's questions, one question per call for the others), greedy with EOS ignored, so every
answer is exactly ``new_tokens`` long. Per K, each repeat runs every job on each context in turn,
starting with a different job each time, and every ratio is a median over these side-by-side
(repeat, context) pairs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from .. import models
from ..config import BenchConfig, CollatorConfig, DecodeConfig
from ..decoding import DecodeResult, prompts_only, step_inputs
from ..evaluation import run_mode
from ..layout import Branch, BranchSample, build_layout
from ..masks import layout_attention_mask
from .clocks import CPU, WALL, median, now, since, timed

log = logging.getLogger(__name__)


def make_workload(cfg: BenchConfig, vocab: int) -> list[BranchSample]:
    """``contexts`` random contexts, each with ``max(branches)`` random questions (no targets).

    A run with K branches uses the first K questions of every context, so the K = 1 question is
    also among the K = 16 ones. Tokens avoid ids 0 and 1 (padding / special tokens).
    """
    rng = random.Random(cfg.seed)
    low = 2 if vocab > 2 else 0
    draw = lambda n: [rng.randrange(low, vocab) for _ in range(n)]  # noqa: E731
    k_max = max(int(k) for k in cfg.branches)
    return [BranchSample(draw(cfg.context_tokens),
                         [Branch(draw(cfg.question_tokens), []) for _ in range(k_max)])
            for _ in range(cfg.contexts)]


def first_k(samples: Sequence[BranchSample], k: int) -> list[BranchSample]:
    return [BranchSample(s.background, s.branches[:k], s.meta) for s in samples]


@dataclass

@dataclass
class Decoder:
    """What every mode needs to decode: the model, the collator's settings (alignment, stride,
    isolation: as in training and evaluation), the decode config and the special token ids."""

    model: torch.nn.Module
    decode: DecodeConfig
    collator: CollatorConfig
    pad_id: int
    eos_id: Optional[int]

    def run(self, mode: str, workload: Sequence[BranchSample]) -> DecodeResult:
        """Answer every question of ``workload`` in ``mode`` (one context or question per call)."""
        _, result = run_mode(mode, self.model, workload, tokenizer=None,
                             collator_cfg=self.collator, decode_cfg=self.decode, batch_size=1,
                             progress=False, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        return result


class BareForwards:
    """The model forwards of one columnar decode of ``sample``, with no decoder logic.

    Inputs, 2D positions and masks of the prefill and of the ``new_tokens - 1`` steps (every
    branch active) are built once, outside the timer, by the decoder's own step builder
    (:func:`paradec.decoding.step_inputs`); :meth:`run` then runs the prefill into a fresh KV
    cache and the steps on top of it (so each step sees a cache of realistic length) and returns
    the ``(wall_s, cpu_s)`` of the prefill and of the steps.
    """

    def __init__(self, model, sample: BranchSample, new_tokens: int, collator: CollatorConfig,
                 pad_id: int, vocab: int):
        self.model = model
        device = next(model.parameters()).device
        layout = build_layout(prompts_only([sample]), align_to=collator.align_to,
                              interleave=True, branch_stride=collator.branch_stride,
                              pad_id=pad_id).to(device)
        layout.isolate_branches = collator.isolate_branches
        self.prefill = dict(input_ids=layout.input_ids, position_ids=layout.pos2d,
                            attention_mask=layout_attention_mask(model, layout),
                            logits_to_keep=layout.last_index.clamp(min=0))
        self.prefill_tokens = int(layout.input_ids.shape[1])
        K = layout.last_index.shape[1]
        q_branch = torch.arange(1, K + 1, device=device)[None]
        q_valid = torch.ones(1, K, dtype=torch.bool, device=device)
        cached = (layout.column, layout.valid, layout.branch)
        gen = torch.Generator().manual_seed(0)
        self.steps = []
        for t in range(1, new_tokens):
            q_column = (layout.target_start[:, None] + t - 1).expand(1, K)
            cached, mask, pos2d = step_inputs(model, cached, q_column, q_valid, q_branch,
                                              branch_stride=collator.branch_stride,
                                              isolate_branches=collator.isolate_branches)
            self.steps.append(dict(input_ids=torch.randint(0, vocab, (1, K), generator=gen).to(device),
                                   position_ids=pos2d, attention_mask=mask))

    @torch.no_grad()
    def run(self) -> tuple[tuple[float, float], tuple[float, float]]:
        cache = DynamicCache(config=self.model.config)
        with_cache = models.cache_kwargs(self.model, cache)
        start = now()
        self.model(**self.prefill, **with_cache, use_cache=True).logits.argmax(-1)
        prefill = since(start)
        start = now()
        for step in self.steps:
            self.model(**step, **with_cache, use_cache=True).logits.argmax(-1)
        return prefill, since(start)


def bench_decoding(decoder: Decoder, workload: list[BranchSample], cfg: BenchConfig,
                   vocab: int, clock: str) -> tuple[list[dict], dict, dict, dict]:
    """``decode`` rows, ``decode_limit`` and ``speedup`` per K, and the bare forward times.

    Per K, every repeat runs every job (each mode, and the bare forwards) on each context in
    turn, starting with a different job each time; ratios are medians over these side-by-side
    (repeat, context) pairs, so a change of load during the run hits both sides of a ratio.
    """
    c = CPU if clock == "cpu" else WALL
    rows, limits, speed, bare_report = [], {}, {}, {}
    modes = list(cfg.modes)
    T = decoder.decode.max_new_tokens
    for K in [int(k) for k in cfg.branches]:
        work = first_k(workload, K)
        n_questions = len(work) * K
        jobs = {m: [(lambda m=m, s=s: decoder.run(m, [s])) for s in work] for m in modes}
        bare = {}
        if cfg.limit:
            bare["parallel"] = [BareForwards(decoder.model, s, T, decoder.collator,
                                             decoder.pad_id, vocab) for s in work]
            bare["sequential"] = [BareForwards(decoder.model, BranchSample(s.background,
                                                                           s.branches[:1]),
                                               T, decoder.collator, decoder.pad_id, vocab)
                                  for s in work]
            for name, runs in bare.items():
                jobs[f"bare_{name}"] = [b.run for b in runs]
        names = list(jobs)
        for _ in range(cfg.warmup):  # the first context of each job: shapes, allocator, caches
            for name in names:
                jobs[name][0]()
        # times[name][r][i] = (wall, cpu) of job `name` on context i in repeat r (bare: steps too)
        times = {name: [] for name in names}
        results = {}
        turn = 0
        for r in range(cfg.repeats):
            for name in names:
                times[name].append([None] * len(work))
            for i in range(len(work)):
                turn += 1
                for name in names[turn % len(names):] + names[:turn % len(names)]:
                    took, out = timed(jobs[name][i])
                    if name.startswith("bare_"):
                        took = out  # (prefill, steps): the bare forwards time themselves
                    elif r == cfg.repeats - 1:
                        results.setdefault(name, DecodeResult(tokens=[])).merge(out)
                    times[name][r][i] = took
        total = lambda name, r, k: sum(t[k] for t in times[name][r])  # noqa: E731
        pairs = [(r, i) for r in range(cfg.repeats) for i in range(len(work))]
        for mode in modes:
            res = results[mode]
            wall = median(total(mode, r, WALL) for r in range(cfg.repeats))
            cpu = median(total(mode, r, CPU) for r in range(cfg.repeats))
            rows.append({
                "branches": K, "mode": mode, "wall_s": wall, "cpu_s": cpu,
                "questions_per_s": n_questions / wall, "questions_per_cpu_s": n_questions / cpu,
                "questions": n_questions, "contexts": len(work),
                "forward_calls": res.forward_calls / len(work),  # per context
                "forward_calls_total": res.forward_calls,
                "new_tokens": res.new_tokens, "peak_kv_tokens": res.peak_kv_tokens,
            })

        def paired(num: str, den: str, k: int) -> Optional[float]:
            """Median over (repeat, context) of time(num) / time(den): the speedup of den."""
            if num not in times or den not in times:
                return None
            return median(times[num][r][i][k] / times[den][r][i][k] for r, i in pairs)

        row = {m: next(x for x in rows if x["branches"] == K and x["mode"] == m) for m in modes}
        entry = {
            "achieved": paired("sequential", "parallel", c),
            "vs_batched": paired("batched", "parallel", c),
            "kv_vs_batched": (row["parallel"]["peak_kv_tokens"] / row["batched"]["peak_kv_tokens"]
                              if "parallel" in row and "batched" in row else None),
            "achieved_wall": paired("sequential", "parallel", WALL),
            "achieved_cpu": paired("sequential", "parallel", CPU),
            "vs_sequential": {m: paired("sequential", m, c) for m in modes},
        }
        if cfg.limit:
            def limit(k: int) -> float:
                def one(r, i):
                    (sp, ss) = times["bare_sequential"][r][i]
                    (pp, ps) = times["bare_parallel"][r][i]
                    return K * (sp[k] + ss[k]) / (pp[k] + ps[k])
                return median(one(r, i) for r, i in pairs)

            limits[K] = limit(c)
            entry.update(limit_wall=limit(WALL), limit_cpu=limit(CPU))
            if entry["achieved"] is not None:
                entry["limit_fraction"] = entry["achieved"] / limits[K]
            med = lambda name, part: median(  # noqa: E731  per context, on the ratio clock
                times[name][r][i][part][c] for r, i in pairs)
            bare_report[K] = {
                "parallel_prefill_s": med("bare_parallel", 0),
                "parallel_steps_s": med("bare_parallel", 1),
                "sequential_prefill_s": med("bare_sequential", 0),
                "sequential_steps_s": med("bare_sequential", 1),
                "parallel_prefill_tokens": bare["parallel"][0].prefill_tokens,
                "sequential_prefill_tokens": bare["sequential"][0].prefill_tokens,
            }
        speed[K] = entry
        log.info("K=%d: %s; parallel/sequential %s, limit %s", K, ", ".join(
            f"{x['mode']} {n_questions / (x['cpu_s'] if c == CPU else x['wall_s']):.2f} q/s"
            for x in row.values()), entry["achieved"], limits.get(K))
    return rows, limits, speed, bare_report
