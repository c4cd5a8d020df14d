"""The decoding benchmark: workloads, each mode timed on them side by side, and the limits.

Invariant: every mode decodes the same questions with the same settings through the evaluation's
own dispatch (:func:`paradec.evaluation.run_mode`: one context per call for the modes that batch
a context's questions, one question per call for the others), greedy with EOS ignored, so every
answer is exactly ``new_tokens`` long. Per workload (a context length N and a question count K,
or a data task's own contexts), each repeat runs every mode on each context in turn, starting
with a different mode each time, and every ratio is a median over these side-by-side
(repeat, context) pairs. A mode that answers one question at a time (``sequential``,
``baseline``) costs the same per question whatever K is: it answers the first
``bench.single_questions`` questions of each context, and every figure of it is per question.
A run is split at its first new token: the prefill (everything before it) and the steps after.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import models
from ..config import BenchConfig, CollatorConfig, DecodeConfig
from ..decoding import DecodeResult, prompts_only, step_inputs
from ..evaluation import run_mode
from ..kv_cache import reserved_cache
from ..layout import Branch, BranchSample, build_layout
from ..masks import layout_attention_mask
from .clocks import CPU, WALL, median, now, since, timed
from .roofline import Machine, ModelCosts, mode_limits

log = logging.getLogger(__name__)

ONE_AT_A_TIME = ("sequential", "baseline")  # modes whose cost per question does not depend on K


def make_contexts(cfg: BenchConfig, vocab: int, context_tokens: int) -> list[BranchSample]:
    """``contexts`` random contexts of ``context_tokens`` tokens, each with ``max(branches)``
    random questions (no targets). A workload with K questions takes the first K of each
    context, so the K = 1 question is also among the K = 16 ones. Tokens avoid ids 0 and 1
    (padding / special tokens); the same seed and N give the same contexts."""
    rng = random.Random(f"{cfg.seed}-{context_tokens}")
    low = 2 if vocab > 2 else 0
    draw = lambda n: [rng.randrange(low, vocab) for _ in range(n)]  # noqa: E731
    k_max = max(int(k) for k in cfg.branches)
    return [BranchSample(draw(context_tokens),
                         [Branch(draw(cfg.question_tokens), []) for _ in range(k_max)])
            for _ in range(cfg.contexts)]


def first_k(samples: Sequence[BranchSample], k: int) -> list[BranchSample]:
    return [BranchSample(s.background, s.branches[:k], s.meta) for s in samples]


def prefill_tokens(mode: str, context: int, questions: Sequence[int], single: int) -> int:
    """Tokens one context's decode in ``mode`` prefills (what ``bench.max_cell_tokens`` caps)."""
    k = len(questions)
    if mode in ONE_AT_A_TIME:
        return sum(context + q for q in questions[:single])
    if mode == "batched":
        return k * context + sum(questions)
    return context + sum(questions)  # parallel, prefix, joint: the context once


@dataclass
class Decoder:
    """What every mode needs to decode: the model, the collator's settings (alignment, stride,
    isolation: as in training and evaluation), the decode config and the special token ids."""

    model: torch.nn.Module
    decode: DecodeConfig
    collator: CollatorConfig
    pad_id: int
    eos_id: Optional[int]

    def run(self, mode: str, workload: Sequence[BranchSample], on_step=None) -> DecodeResult:
        """Answer every question of ``workload`` in ``mode`` (one context or question per call)."""
        _, result = run_mode(mode, self.model, workload, tokenizer=None,
                             collator_cfg=self.collator, decode_cfg=self.decode, batch_size=1,
                             progress=False, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                             on_step=on_step)
        return result


class StepClock:
    """An ``on_step`` callback that times the steps of every decoder call of one run: from its
    first new token (t = 0, right after the prefill) to its last. The rest of the run is the
    prefill and its set-up."""

    def __init__(self):
        self.spans: list[list] = []

    def __call__(self, t: int, *_):
        stamp = now()
        if t == 0:
            self.spans.append([stamp, stamp])
        else:
            self.spans[-1][1] = stamp

    def steps(self) -> tuple[float, float]:
        return (sum(end[WALL] - start[WALL] for start, end in self.spans),
                sum(end[CPU] - start[CPU] for start, end in self.spans))


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
        self.cache_tokens = self.prefill_tokens + K * (new_tokens - 1)
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
        cache = reserved_cache(self.model, self.cache_tokens)
        with_cache = models.cache_kwargs(self.model, cache)
        start = now()
        self.model(**self.prefill, **with_cache, use_cache=True).logits.argmax(-1)
        prefill = since(start)
        start = now()
        for step in self.steps:
            self.model(**step, **with_cache, use_cache=True).logits.argmax(-1)
        return prefill, since(start)


@dataclass
class Timing:
    """One job on one context in one repeat: whole run and its steps, ``(wall, cpu)`` each."""

    total: tuple[float, float]
    steps: tuple[float, float]
    questions: int
    result: Optional[DecodeResult] = None


@dataclass
class Measured:
    """Every timing of one workload: ``times[job][r][i]`` for repeat r and context i."""

    times: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)  # mode -> DecodeResult of the last repeat
    skipped: dict = field(default_factory=dict)  # mode -> why it did not run


def plan_jobs(decoder: Decoder, work: Sequence[BranchSample], cfg: BenchConfig, vocab: int,
              modes: Sequence[str], limit: bool) -> tuple[dict, dict]:
    """``(jobs, skipped)``: per mode (and, with ``limit``, the bare forwards of parallel and of
    one sequential question) one callable per context of ``work``; the modes over
    ``bench.max_cell_tokens`` are skipped, with why."""
    single = cfg.single_questions
    jobs, skipped = {}, {}
    for mode in modes:
        too_big = max(prefill_tokens(mode, len(s.background), [len(b.prompt) for b in s.branches],
                                     single) for s in work)
        if too_big > cfg.max_cell_tokens:
            skipped[mode] = (f"prefills {too_big} tokens per context > "
                             f"bench.max_cell_tokens={cfg.max_cell_tokens}")
            continue
        units = [BranchSample(s.background, s.branches[:single]) if mode in ONE_AT_A_TIME
                 else s for s in work]
        jobs[mode] = [functools.partial(_timed_run, decoder, mode, u) for u in units]
    if limit and "parallel" in jobs:
        T = decoder.decode.max_new_tokens
        for name, units in (("bare_parallel", work),
                            ("bare_sequential", [BranchSample(s.background, s.branches[:1])
                                                 for s in work])):
            bare = [BareForwards(decoder.model, u, T, decoder.collator, decoder.pad_id, vocab)
                    for u in units]
            jobs[name] = [functools.partial(_bare_run, b, len(u.branches))
                          for b, u in zip(bare, units)]
    return jobs, skipped


def time_jobs(plans: dict, repeats: int) -> dict:
    """Time every workload's jobs: ``plans[key] = (jobs, skipped)``, each job a list of one
    callable per context. In each repeat the workloads come in turn, and within one the jobs
    take turns on every context, starting with a different job each time. Returns
    ``{key: Measured}``."""
    out = {key: Measured(skipped=dict(skipped)) for key, (_, skipped) in plans.items()}
    for key, (jobs, _) in plans.items():
        contexts = len(next(iter(jobs.values()))) if jobs else 0
        out[key].times = {name: [[None] * contexts for _ in range(repeats)] for name in jobs}
    turn = 0
    for r in range(repeats):
        for key, (jobs, _) in plans.items():
            names = list(jobs)
            for i in range(len(next(iter(jobs.values()))) if jobs else 0):
                turn += 1
                for name in names[turn % len(names):] + names[:turn % len(names)]:
                    timing = jobs[name][i]()
                    out[key].times[name][r][i] = timing
                    if timing.result is not None and r == repeats - 1:
                        out[key].results.setdefault(name, DecodeResult(tokens=[])).merge(
                            timing.result)
    return out


def _timed_run(decoder: Decoder, mode: str, unit: BranchSample) -> Timing:
    clock = StepClock()
    took, result = timed(lambda: decoder.run(mode, [unit], on_step=clock))
    return Timing(total=took, steps=clock.steps(), questions=len(unit.branches), result=result)


def _bare_run(bare: BareForwards, questions: int) -> Timing:
    prefill, steps = bare.run()
    return Timing(total=(prefill[WALL] + steps[WALL], prefill[CPU] + steps[CPU]), steps=steps,
                  questions=questions)


def summarise(measured: Measured, work: Sequence[BranchSample], cfg: BenchConfig, clock: str,
              costs: ModelCosts, machine: Optional[Machine], label: dict) -> list[dict]:
    """One row per mode: times (medians over repeats of the sum over contexts), questions/s,
    the prefill / steps split, forward calls, peak KV tokens, the machine limit and the
    fraction of it reached, and parallel's speedup over the mode (median of per-question pairs).
    ``label`` (model, N, K, ...) starts every row."""
    c = CPU if clock == "cpu" else WALL
    T = cfg.new_tokens
    times = measured.times
    repeats = range(cfg.repeats)
    pairs = [(r, i) for r in repeats for i in range(len(work))]
    per_q = lambda name, r, i, part: (  # noqa: E731  seconds per question on the ratio clock
        getattr(times[name][r][i], part)[c] / times[name][r][i].questions)
    rows = []
    for mode in cfg.modes:
        if mode in measured.skipped:
            rows.append({**label, "mode": mode, "skipped": measured.skipped[mode]})
            continue
        runs = times[mode]
        questions = sum(t.questions for t in runs[0])
        total = lambda k, part="total", runs=runs: median(  # noqa: E731
            sum(getattr(t, part)[k] for t in rep) for rep in runs)
        wall, cpu, steps = total(WALL), total(CPU), total(c, "steps")
        res = measured.results[mode]
        row = {**label, "mode": mode, "questions": questions, "contexts": len(work),
               "wall_s": wall, "cpu_s": cpu, "questions_per_s": questions / wall,
               "questions_per_cpu_s": questions / cpu,
               "prefill_s": (cpu if c == CPU else wall) - steps, "steps_s": steps,
               "step_ms": 1e3 * steps / max(1, res.forward_calls - _prefill_calls(mode, runs)),
               "forward_calls": res.forward_calls / len(work),  # per context
               "new_tokens": res.new_tokens, "peak_kv_tokens": res.peak_kv_tokens}
        if machine is not None:
            prefill_lim = steps_lim = 0.0
            for s, t in zip(work, runs[0]):
                p, st = mode_limits(costs, machine, mode, len(s.background),
                                    len(s.branches), _mean_question(s), T, t.questions)
                prefill_lim, steps_lim = prefill_lim + p, steps_lim + st
            row.update(limit_s=prefill_lim + steps_lim, steps_limit_s=steps_lim,
                       limit_fraction=(prefill_lim + steps_lim) / (row["prefill_s"] + steps),
                       steps_limit_fraction=steps_lim / steps if steps > 0 else None)
        if "parallel" in times and mode != "parallel":
            row["parallel_speedup"] = median(per_q(mode, r, i, "total") /
                                             per_q("parallel", r, i, "total") for r, i in pairs)
            row["parallel_step_speedup"] = median(
                per_q(mode, r, i, "steps") / per_q("parallel", r, i, "steps") for r, i in pairs)
        rows.append(row)
    return rows


def _prefill_calls(mode: str, runs) -> int:
    """Forward calls of one context's run (last repeat) that are prefills, not steps."""
    units = runs[-1][0].questions if mode in ONE_AT_A_TIME else 1
    return units * (2 if mode == "prefix" else 1) * len(runs[-1])


def _mean_question(sample: BranchSample) -> int:
    return round(sum(len(b.prompt) for b in sample.branches) / max(1, len(sample.branches)))


def bare_limit(measured: Measured, K: int, repeats: int, n_contexts: int,
               clock: str) -> Optional[dict]:
    """The speedup of parallel over sequential if the decoder cost nothing but its model
    forwards: ``K x bare sequential(1 question) / bare parallel(K)``, median of the pairs; and
    the achieved speedup as a fraction of it."""
    times = measured.times
    if "bare_parallel" not in times:
        return None
    c = CPU if clock == "cpu" else WALL
    pairs = [(r, i) for r in range(repeats) for i in range(n_contexts)]
    limit = median(K * times["bare_sequential"][r][i].total[c] / times["bare_parallel"][r][i].total[c]
                   for r, i in pairs)
    out = {"limit": limit,
           "parallel_prefill_s": median(times["bare_parallel"][r][i].total[c]
                                        - times["bare_parallel"][r][i].steps[c] for r, i in pairs),
           "parallel_steps_s": median(times["bare_parallel"][r][i].steps[c] for r, i in pairs)}
    if "parallel" in times and "sequential" in times:
        achieved = median(
            (times["sequential"][r][i].total[c] / times["sequential"][r][i].questions)
            / (times["parallel"][r][i].total[c] / times["parallel"][r][i].questions)
            for r, i in pairs)
        out.update(achieved=achieved, fraction=achieved / limit)
    return out


def bench_grid(decoder: Decoder, cfg: BenchConfig, vocab: int, clock: str, costs: ModelCosts,
               machine: Optional[Machine], model_name: str, progress) -> tuple[list, dict]:
    """Every (N, K) of the grid: ``decode`` rows and the bare-forward ``limits`` per (N, K).

    Per N, each repeat visits every K in turn. The modes that answer one question at a time run
    once per N and repeat (on the first ``bench.single_questions`` questions of each context:
    their cost per question does not depend on K) and pair with every K of the same repeat. The
    bare forwards run at the smallest N, where the decoder's own work weighs most.
    """
    rows, limits = [], {}
    ks = [int(k) for k in cfg.branches]
    lengths = [int(n) for n in cfg.context_lengths]
    single_modes = [m for m in cfg.modes if m in ONE_AT_A_TIME]
    for N in lengths:
        contexts = make_contexts(cfg, vocab, N)
        progress.set_postfix_str(f"{model_name} N={N}")
        plans = {K: plan_jobs(decoder, first_k(contexts, K), cfg, vocab,
                              [m for m in cfg.modes if m not in ONE_AT_A_TIME],
                              cfg.limit and N == min(lengths)) for K in ks}
        plans["single"] = plan_jobs(decoder, contexts, cfg, vocab, single_modes, False)
        measured = time_jobs(plans, cfg.repeats)
        single = measured.pop("single")
        for K in ks:
            m = measured[K]
            m.times.update(single.times)
            m.results.update(single.results)
            m.skipped.update(single.skipped)
            work = first_k(contexts, K)
            label = {"model": model_name, "context_tokens": N, "branches": K}
            new = summarise(m, work, cfg, clock, costs, machine, label)
            rows += new
            limit = bare_limit(m, K, cfg.repeats, len(work), clock)
            if limit is not None:
                limits[f"N{N}_K{K}"] = {**label, **limit}
            log.info("%s N=%d K=%d: %s", model_name, N, K, ", ".join(
                f"{r['mode']} {r['questions'] / (r['cpu_s'] if clock == 'cpu' else r['wall_s']):.2f} q/s"
                for r in new if "skipped" not in r))
        progress.update(len(ks))
    return rows, limits


def bench_samples(decoder: Decoder, samples: list[BranchSample], cfg: BenchConfig, vocab: int,
                  clock: str, costs: ModelCosts, machine: Optional[Machine],
                  model_name: str) -> list[dict]:
    """Every mode on a data task's own contexts and questions (their real token lengths)."""
    measured = time_jobs({"data": plan_jobs(decoder, samples, cfg, vocab, cfg.modes, False)},
                         cfg.repeats)["data"]
    label = {"model": model_name, "contexts_from": "data",
             "context_tokens": round(sum(len(s.background) for s in samples) / len(samples)),
             "branches": max(len(s.branches) for s in samples),
             "question_tokens": round(sum(_mean_question(s) for s in samples) / len(samples))}
    return summarise(measured, samples, cfg, clock, costs, machine, label)

