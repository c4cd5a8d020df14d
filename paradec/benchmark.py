"""stage=bench: what parallel decoding buys, measured side by side in one process.

``python run.py stage=bench`` writes ``bench.json``, ``bench.md`` and ``bench.png`` in the run dir.

Invariant: every figure that is compared with another is measured in the same run, on the same
model, the same tokens and the same thread count (pinned with ``torch.set_num_threads`` and
reported), with warm-up excluded. Inside each of ``bench.repeats`` repeats the jobs of one K (each
mode, and the bare forwards) take turns on every context, starting with a different job each
time, and every ratio is the median over these side-by-side (repeat, context) pairs, so a change
of machine load hits both sides of a ratio. Ratios use ``bench.clock``: with one thread, ``auto``
means process CPU time, which time taken by other processes on a shared machine cannot inflate;
wall-clock figures are reported beside them. Every decoding mode does the same work: greedy, EOS
ignored, exactly ``new_tokens`` per answer. ``parallel`` and ``sequential`` run the one columnar
decoder (:func:`paradec.decoding.decode_columnar`), ``batched`` (and ``baseline``) the unpatched
model through ``generate`` (:func:`paradec.decoding.decode_plain`), as in evaluation.

What is measured:
  decode        per (K, mode): wall and CPU time of the workload (``contexts`` contexts of
                ``context_tokens`` tokens, each with K questions of ``question_tokens`` tokens),
                questions/s, forward calls per context and the peak KV-cache tokens of one call.
  decode_limit  per K: the speedup of parallel over sequential if the decoder cost nothing but
                its model forwards, from bare forwards of the shapes each mode needs (inputs,
                positions and masks prepared outside the timer, a real growing KV cache):
                ``K * (prefill(N+q) + steps(1)) / (prefill(N+K*q) + steps(K))``, where steps(k)
                is the T-1 one-column steps of k tokens each. Reported beside the achieved one.
  training      one columnar training step (columnar mask, the model's attention
                implementation) over one plain causal step (``attention_mask=None``, i.e.
                ``is_causal`` attention) on the same tokens and model: ``train_overhead``.
                Both sides project every position onto the vocabulary, so the ratio isolates
                what the columnar mask and 2D RoPE cost; the training loop's
                :func:`paradec.training.labelled_loss` also skips the projection of unlabelled
                positions, a saving that depends on the task (answers only vs every token), not
                on the layout.
  masks         bytes of the dense bool ``[1, 1, L, L]`` mask at each ``mask_lengths`` L, and of
                the FlexAttention ``BlockMask`` (:func:`paradec.masks.flex_block_mask`) when it
                can be built here.
  collator      tokens/s of the collator (:func:`paradec.bench.layout_throughput`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from transformers import DynamicCache

from . import models
from .decoding import DecodeConfig, DecodeResult, decode_columnar, decode_plain, prompts_only
from .layout import Branch, BranchSample, build_layout
from .loss import IGNORE_INDEX, columnar_loss
from .masks import columnar_mask, flex_block_mask, layout_attention_mask, mask_for_model
from .rope import columnar_settings

log = logging.getLogger(__name__)

BENCH_MODES = ("parallel", "sequential", "batched", "baseline")
# Speed targets on a CPU, checked and reported in bench.json / bench.md.
TARGET_LIMIT_FRACTION = 0.85   # parallel reaches this fraction of its limit at every K >= 2
TARGET_VS_BATCHED = 1.5        # parallel / batched questions per second at the reference K
TARGET_KV_FRACTION = 0.25      # parallel / batched peak KV tokens at the reference K
TARGET_TRAIN_OVERHEAD = 1.3    # columnar / plain causal training step
REFERENCE_K = 8


@dataclass
class BenchConfig:
    """Schema of the ``bench`` node (documented in ``conf/bench/default.yaml``)."""

    # A conf/model preset built with random weights; None = the composed ``model`` group.
    model: Optional[str] = "minimind2_small"
    threads: int = 1                 # torch.set_num_threads; 0 = torch's default (all cores)
    seed: int = 0                    # model init and random tokens
    clock: str = "auto"              # ratios on: cpu (process time), wall, auto = cpu with 1 thread
    branches: list = field(default_factory=lambda: [1, 2, 4, 8, 16])
    modes: list = field(default_factory=lambda: ["parallel", "sequential", "batched"])
    contexts: int = 2                # contexts in the decoding workload
    context_tokens: int = 300
    question_tokens: int = 12
    new_tokens: int = 16             # per answer, EOS ignored
    repeats: int = 5                 # timed repeats (medians reported)
    warmup: int = 1                  # untimed runs first
    limit: bool = True               # time bare forwards for decode_limit
    train: bool = True
    train_batch: int = 2             # samples per training step
    train_branches: int = 4          # branches per sample
    train_background_tokens: int = 128
    train_branch_tokens: int = 96    # tokens per branch (all target)
    train_repeats: int = 3
    mask_lengths: list = field(default_factory=lambda: [2048, 4096, 8192])
    flex: bool = True                # also build FlexAttention BlockMasks for mask_lengths
    collator_repeats: int = 10       # collator throughput (paradec.bench.layout_throughput)
    collator_samples: int = 8
    collator_branches: int = 16
    collator_tokens: int = 256
    plot: bool = True

    def validate(self) -> "BenchConfig":
        def bad(key, why):
            raise ValueError(f"bench.{key}: {why}")

        if self.clock not in CLOCKS:
            bad("clock", f"must be one of {list(CLOCKS)}, got {self.clock!r}")
        unknown = [m for m in self.modes if m not in BENCH_MODES]
        if unknown or not self.modes:
            bad("modes", f"unknown mode(s) {unknown or list(self.modes)}; "
                         f"choose from {list(BENCH_MODES)}")
        if len(set(self.modes)) != len(self.modes):
            bad("modes", f"lists a mode twice: {list(self.modes)}")
        if not self.branches or any(int(k) < 1 for k in self.branches):
            bad("branches", f"must be branch counts >= 1, got {list(self.branches)}")
        for key in ("contexts", "question_tokens", "new_tokens", "repeats", "train_batch",
                    "train_branches", "train_branch_tokens", "train_repeats", "collator_repeats",
                    "collator_samples", "collator_branches", "collator_tokens"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("threads", "warmup", "context_tokens", "train_background_tokens"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if any(int(n) < 1 for n in self.mask_lengths):
            bad("mask_lengths", f"must be positive lengths, got {list(self.mask_lengths)}")
        return self


# --------------------------------------------------------------------------------------------
# Workload and decoding modes
# --------------------------------------------------------------------------------------------

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
class Decoder:
    """What every mode needs to decode: the model, its settings and the decode config."""

    model: torch.nn.Module
    decode: DecodeConfig
    branch_stride: int
    align_to: str
    pad_id: int
    eos_id: Optional[int]

    def columnar(self, samples: list[BranchSample]) -> DecodeResult:
        return decode_columnar(self.model, samples, eos_token_id=self.eos_id,
                               pad_token_id=self.pad_id, align_to=self.align_to,
                               branch_stride=self.branch_stride, cfg=self.decode)

    def plain(self, rows: list[list[int]]) -> DecodeResult:
        return decode_plain(self.model, rows, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                            cfg=self.decode)

    def run(self, mode: str, workload: Sequence[BranchSample]) -> DecodeResult:
        """Answer every question of ``workload`` in ``mode``; calls are per context or question."""
        total = DecodeResult(tokens=[])
        for s in workload:
            if mode == "parallel":  # all K questions of a context as branches of one sample
                calls = [lambda s=s: self.columnar([s])]
            elif mode == "sequential":  # the same decoder, one question per call (batch 1)
                calls = [lambda b=b: self.columnar([BranchSample(s.background, [b])])
                         for b in s.branches]
            elif mode == "batched":  # one left-padded batch, the context copied into every row
                calls = [lambda s=s: self.plain([s.background + b.prompt for b in s.branches])]
            else:  # baseline: the unpatched model, one question at a time
                calls = [lambda b=b: self.plain([s.background + b.prompt]) for b in s.branches]
            for call in calls:
                total.merge(call())
        return total


# --------------------------------------------------------------------------------------------
# Clocks: every duration is measured on both, and ratios use the configured one
# --------------------------------------------------------------------------------------------

CLOCKS = ("auto", "cpu", "wall")
WALL, CPU = 0, 1  # indices into a timing pair (wall seconds, process CPU seconds)


def resolve_clock(clock: str, threads: int) -> str:
    """``auto``: process CPU time with one thread (other processes on a shared machine then
    cannot skew a ratio by taking the core away), wall time with several (CPU time would add
    up the threads)."""
    if clock == "auto":
        return "cpu" if threads == 1 else "wall"
    return clock


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _now()
    return wall - start[WALL], cpu - start[CPU]


def _timed(fn: Callable[[], object]) -> tuple[tuple[float, float], object]:
    """``((wall_s, cpu_s), fn())``; garbage from earlier work is collected before the clock."""
    gc.collect()
    start = _now()
    out = fn()
    return _since(start), out


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------
# The limit: bare forwards of the shapes each mode needs
# --------------------------------------------------------------------------------------------

class BareForwards:
    """The model forwards of one columnar decode of ``sample``, with no decoder logic.

    Inputs, 2D positions and masks of the prefill and of the ``new_tokens - 1`` steps (every
    branch active) are built once, outside the timer; :meth:`run` then runs the prefill into a
    fresh KV cache and the steps on top of it (so each step sees a cache of realistic length)
    and returns the ``(wall_s, cpu_s)`` of the prefill and of the steps.
    """

    def __init__(self, model, sample: BranchSample, new_tokens: int, branch_stride: int,
                 align_to: str, pad_id: int, vocab: int):
        self.model = model
        layout = build_layout(prompts_only([sample]), align_to=align_to, interleave=True,
                              branch_stride=branch_stride, pad_id=pad_id)
        self.prefill = dict(input_ids=layout.input_ids, position_ids=layout.pos2d,
                            attention_mask=layout_attention_mask(model, layout),
                            logits_to_keep=layout.last_index.clamp(min=0))
        self.prefill_tokens = int(layout.input_ids.shape[1])
        K = layout.last_index.shape[1]
        q_branch = torch.arange(1, K + 1)[None]
        q_valid = torch.ones(1, K, dtype=torch.bool)
        k_column, k_valid, k_branch = layout.column, layout.valid, layout.branch
        gen = torch.Generator().manual_seed(0)
        self.steps = []
        for t in range(1, new_tokens):
            q_column = (layout.target_start[:, None] + t - 1).expand(1, K)
            past = k_column.shape[1]
            k_column = torch.cat((k_column, q_column), 1)
            k_valid = torch.cat((k_valid, q_valid), 1)
            k_branch = torch.cat((k_branch, q_branch), 1)
            mask = mask_for_model(model, k_column, k_valid, k_branch, q_column=q_column,
                                  q_valid=q_valid, q_branch=q_branch, q_offset=past)
            self.steps.append(dict(
                input_ids=torch.randint(0, vocab, (1, K), generator=gen),
                position_ids=torch.stack((q_branch * branch_stride, q_column), -1),
                attention_mask=mask))

    @torch.no_grad()
    def run(self) -> tuple[tuple[float, float], tuple[float, float]]:
        cache = DynamicCache(config=self.model.config)
        with_cache = models.cache_kwargs(self.model, cache)
        start = _now()
        self.model(**self.prefill, **with_cache, use_cache=True).logits.argmax(-1)
        prefill = _since(start)
        start = _now()
        for step in self.steps:
            self.model(**step, **with_cache, use_cache=True).logits.argmax(-1)
        return prefill, _since(start)


# --------------------------------------------------------------------------------------------
# Decoding benchmark
# --------------------------------------------------------------------------------------------

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
            bare["parallel"] = [BareForwards(decoder.model, s, T, decoder.branch_stride,
                                             decoder.align_to, decoder.pad_id, vocab) for s in work]
            bare["sequential"] = [BareForwards(decoder.model, BranchSample(s.background,
                                                                           s.branches[:1]),
                                               T, decoder.branch_stride, decoder.align_to,
                                               decoder.pad_id, vocab) for s in work]
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
                    took, out = _timed(jobs[name][i])
                    if name.startswith("bare_"):
                        took = out  # (prefill, steps): the bare forwards time themselves
                    elif r == cfg.repeats - 1:
                        results.setdefault(name, DecodeResult(tokens=[])).merge(out)
                    times[name][r][i] = took
        total = lambda name, r, k: sum(t[k] for t in times[name][r])  # noqa: E731
        pairs = [(r, i) for r in range(cfg.repeats) for i in range(len(work))]
        for mode in modes:
            res = results[mode]
            wall = _median(total(mode, r, WALL) for r in range(cfg.repeats))
            cpu = _median(total(mode, r, CPU) for r in range(cfg.repeats))
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
            return _median(times[num][r][i][k] / times[den][r][i][k] for r, i in pairs)

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
                return _median(one(r, i) for r, i in pairs)

            limits[K] = limit(c)
            entry.update(limit_wall=limit(WALL), limit_cpu=limit(CPU))
            if entry["achieved"] is not None:
                entry["limit_fraction"] = entry["achieved"] / limits[K]
            med = lambda name, part: _median(  # noqa: E731  per context, on the ratio clock
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
            for x in row.values()), _fmt(entry["achieved"], 2), _fmt(limits.get(K), 2))
    return rows, limits, speed, bare_report


# --------------------------------------------------------------------------------------------
# Training, masks, collator
# --------------------------------------------------------------------------------------------

def bench_training(model, cfg: BenchConfig, branch_stride: int, vocab: int,
                   clock: str) -> dict:
    """Columnar vs plain causal training step (forward, loss, backward, optimizer) on one batch."""
    rng = random.Random(cfg.seed + 1)
    draw = lambda n: [rng.randrange(2, vocab) for _ in range(n)]  # noqa: E731
    samples = [BranchSample(draw(cfg.train_background_tokens),
                            [Branch([], draw(cfg.train_branch_tokens))
                             for _ in range(cfg.train_branches)])
               for _ in range(cfg.train_batch)]
    layout = build_layout(samples, branch_stride=branch_stride, loss_on="target")
    ids = layout.input_ids
    causal_labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)), 1)
    # lr 0: the optimizer does all its work but the weights stay as they were.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    was_training = model.training
    model.train()

    def step(kind: str):
        """((wall, cpu) of forward + loss + backward, (wall, cpu) of the whole step)."""
        gc.collect()
        start = _now()
        if kind == "columnar":
            logits = models.forward_layout(model, layout).logits
            loss, _ = columnar_loss(logits, layout.labels)
        else:  # the unpatched call: no 4D mask, so sdpa runs is_causal attention
            logits = model(input_ids=ids).logits
            loss, _ = columnar_loss(logits, causal_labels)
        loss.backward()
        fwd_bwd = _since(start)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return fwd_bwd, _since(start)

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
    med = lambda kind, part, k=c: _median(t[part][k] for t in times[kind])  # noqa: E731
    ratio = lambda part, k=c: _median(  # noqa: E731  paired, repeat by repeat
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
        (build_s, _), dense = _timed(lambda: columnar_mask(layout.column, layout.valid))
        row = {"length": L, "dense_bool_bytes": dense.numel() * dense.element_size(),
               "dense_float32_bytes": dense.numel() * 4, "dense_build_s": build_s,
               "flex_bytes": None, "flex_build_s": None, "flex_sparsity": None, "flex_error": None}
        del dense
        if cfg.flex:
            try:
                flex_block_mask(layout.column, layout.valid)  # first call imports and warms up
                (flex_s, _), block = _timed(lambda: flex_block_mask(layout.column,
                                                                    layout.valid))
                row.update(flex_bytes=_block_mask_bytes(block), flex_build_s=flex_s,
                           flex_sparsity=float(block.sparsity()),
                           flex_block_size=list(block.BLOCK_SIZE))
            except Exception as err:  # noqa: BLE001 - report why flex is unusable here
                row["flex_error"] = f"{type(err).__name__}: {err}"
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _row(rows: list[dict], K: int, mode: str) -> Optional[dict]:
    return next((r for r in rows if r["branches"] == K and r["mode"] == mode), None)


def check_targets(report: dict, cfg: BenchConfig) -> dict:
    """Each speed target: its value and whether it is met (None = not measured)."""
    rows, speed, limits = report["decode"], report["speedup"], report["decode_limit"]
    targets = {}
    eff = {K: speed[K]["limit_fraction"] for K in limits
           if K >= 2 and speed[K].get("limit_fraction") is not None}
    worst = min(eff, key=eff.get) if eff else None
    targets["parallel_vs_limit"] = {
        "rule": f"parallel/sequential >= {TARGET_LIMIT_FRACTION} x limit at every K >= 2",
        "value": eff[worst] if eff else None, "at_K": worst,
        "met": (eff[worst] >= TARGET_LIMIT_FRACTION) if eff else None}
    ref = REFERENCE_K if REFERENCE_K in speed else max(speed)
    vs_bat = speed[ref]["vs_batched"]
    targets["parallel_vs_batched"] = {
        "rule": f"parallel >= {TARGET_VS_BATCHED}x batched questions/s at K={ref}",
        "value": vs_bat, "at_K": ref,
        "met": None if vs_bat is None else vs_bat >= TARGET_VS_BATCHED}
    kv = speed[ref]["kv_vs_batched"]
    targets["peak_kv"] = {
        "rule": f"parallel peak KV tokens <= {TARGET_KV_FRACTION} x batched at K={ref}",
        "value": kv, "at_K": ref, "met": None if kv is None else kv <= TARGET_KV_FRACTION}
    par_rows = [r for r in rows if r["mode"] == "parallel"]
    expected = 1 + (cfg.new_tokens - 1)
    targets["parallel_forward_calls"] = {
        "rule": f"parallel forward calls per context == 1 + {cfg.new_tokens - 1} at every K",
        "value": sorted({r["forward_calls"] for r in par_rows}),
        "met": all(r["forward_calls"] == expected for r in par_rows) if par_rows else None}
    overhead = (report.get("training") or {}).get("train_overhead")
    targets["train_overhead"] = {
        "rule": f"columnar training step <= {TARGET_TRAIN_OVERHEAD}x a plain causal step",
        "value": overhead, "met": None if overhead is None else overhead <= TARGET_TRAIN_OVERHEAD}
    return targets


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def _mib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else (f"{n / 2**10:.1f} KiB" if n >= 2**10
                                                      else f"{n} B")


def format_markdown(report: dict) -> str:
    """The whole report as markdown (bench.md)."""
    env, w = report["environment"], report["workload"]
    clock = env["ratio_clock"]
    clock_note = ("process CPU time (one thread: time the core was taken by other processes "
                  "does not count)" if clock == "cpu" else "wall time")
    lines = [
        f"# paradec bench: {env['model']} ({env['parameters'] / 1e6:.1f}M parameters, "
        f"{env['attn_implementation']}, {env['dtype']}), {env['threads']} thread(s)",
        "",
        f"Workload: {w['contexts']} context(s) of {w['context_tokens']} tokens, K questions of "
        f"{w['question_tokens']} tokens each, {w['new_tokens']} new tokens per answer (EOS "
        f"ignored), greedy. {w['repeats']} repeat(s) after {w['warmup']} warm-up; in each repeat "
        "the modes and bare forwards take turns on every context. Ratios are medians of these "
        f"side-by-side pairs, on {clock_note}; both clocks are in bench.json. "
        f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu_count']} CPU(s), "
        f"load average {env['load_before'][0]:.2f} before / {env['load_after'][0]:.2f} after, "
        f"{env['bench_s']:.0f} s in all.",
        "",
        "## Decoding",
        "",
        "| K | mode | wall s | CPU s | questions/s (wall) | questions/CPU-s | x sequential | "
        "forward calls / context | peak KV tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["decode"]:
        rel = report["speedup"][r["branches"]]["vs_sequential"].get(r["mode"])
        lines.append(f"| {r['branches']} | {r['mode']} | {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} "
                     f"| {_fmt(r['questions_per_s'], 2)} | {_fmt(r['questions_per_cpu_s'], 2)} | "
                     f"{_fmt(rel, 2)} | {_fmt(r['forward_calls'], 0)} | {r['peak_kv_tokens']} |")
    lines += ["", "## Parallel vs its limit (bare forwards of the same shapes, same run)", "",
              f"Limit = K x (prefill(N+q) + {w['new_tokens'] - 1} steps of 1) / (prefill(N+Kq) + "
              f"{w['new_tokens'] - 1} steps of K), from bare model forwards; achieved = parallel "
              "over sequential questions/s.", "",
              f"| K | limit | achieved | achieved / limit | limit (wall) | achieved (wall) | "
              "parallel / batched q/s | KV parallel / batched |",
              "|---|---|---|---|---|---|---|---|"]
    for K, s in report["speedup"].items():
        lines.append(f"| {K} | {_fmt(report['decode_limit'].get(K), 2)} | {_fmt(s['achieved'], 2)}"
                     f" | {_fmt(s.get('limit_fraction'), 2)} | {_fmt(s.get('limit_wall'), 2)} | "
                     f"{_fmt(s['achieved_wall'], 2)} | {_fmt(s['vs_batched'], 2)} | "
                     f"{_fmt(s['kv_vs_batched'], 3)} |")
    if report.get("bare_forwards"):
        lines += ["", f"Bare forwards per context ({clock} s): the prefill and the steps of one "
                  "parallel decode, and of one sequential question:", "",
                  "| K | parallel prefill (tokens) | parallel steps | sequential prefill (tokens) "
                  "| sequential steps |", "|---|---|---|---|---|"]
        for K, b in report["bare_forwards"].items():
            lines.append(f"| {K} | {_fmt(b['parallel_prefill_s'], 4)} "
                         f"({b['parallel_prefill_tokens']}) | {_fmt(b['parallel_steps_s'], 4)} | "
                         f"{_fmt(b['sequential_prefill_s'], 4)} ({b['sequential_prefill_tokens']})"
                         f" | {_fmt(b['sequential_steps_s'], 4)} |")
    t = report.get("training")
    if t:
        lines += ["", "## Training step", "",
                  f"{t['batch']} x {t['length']} tokens, {t['attn_implementation']}; forward + "
                  f"loss + backward + AdamW step ({t['clock']} s).", "",
                  "| | columnar mask | plain causal (is_causal) | ratio |", "|---|---|---|---|",
                  f"| full step | {_fmt(t['columnar_step_s'])} | {_fmt(t['causal_step_s'])} | "
                  f"{_fmt(t['train_overhead'], 2)} |",
                  f"| forward + backward | {_fmt(t['columnar_fwd_bwd_s'])} | "
                  f"{_fmt(t['causal_fwd_bwd_s'])} | {_fmt(t['train_overhead_fwd_bwd'], 2)} |",
                  "", f"Full step ratio on wall time: {_fmt(t['train_overhead_wall'], 2)}."]
    if report.get("masks"):
        lines += ["", "## Mask memory", "",
                  "| L | dense bool [1,1,L,L] | dense float32 (eager) | flex BlockMask | "
                  "flex build s | flex sparsity % |", "|---|---|---|---|---|---|"]
        for m in report["masks"]:
            flex = _mib(m["flex_bytes"]) if m["flex_bytes"] is not None else (
                "unavailable" if m["flex_error"] else "-")
            lines.append(f"| {m['length']} | {_mib(m['dense_bool_bytes'])} | "
                         f"{_mib(m['dense_float32_bytes'])} | {flex} | "
                         f"{_fmt(m['flex_build_s'])} | {_fmt(m['flex_sparsity'], 1)} |")
    if report.get("collator_tokens_per_s") is not None:
        lines += ["", f"Collator: {report['collator_tokens_per_s'] / 1e6:.2f}M tokens/s."]
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for tgt in report["targets"].values():
        value = tgt["value"]
        value = _fmt(value, 3) if not isinstance(value, list) else ", ".join(map(_fmt, value))
        lines.append(f"| {tgt['rule']} | {value} | {_fmt(tgt['met'])} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """bench.png: questions/s per mode vs K, and achieved vs limit speedup over sequential."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, env = report["decode"], report["environment"]
    cpu = env["ratio_clock"] == "cpu"
    colors = {m: f"C{i}" for i, m in enumerate(BENCH_MODES)}  # one colour per mode, both panels
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["branches"], r["questions_per_cpu_s" if cpu else "questions_per_s"])
                     for r in rows if r["mode"] == mode)
        left.plot(*zip(*pts), marker="o", color=colors[mode], label=mode)
    ks = sorted(report["speedup"])
    left.set(xscale="log", yscale="log", xlabel="K (questions per context)",
             ylabel="questions per CPU-second" if cpu else "questions / s",
             title="Decoding throughput")
    left.set_xticks(ks, [str(k) for k in ks])
    left.grid(alpha=0.3, which="both")
    left.legend()
    speed = report["speedup"]
    lim = [(k, report["decode_limit"][k]) for k in ks if k in report["decode_limit"]]
    if lim:
        right.plot(*zip(*lim), marker="s", linestyle="--", color="black",
                   label="limit (bare forwards)")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = [(k, speed[k]["vs_sequential"].get(mode)) for k in ks]
        pts = [p for p in pts if p[1] is not None]
        if mode != "sequential" and pts:
            right.plot(*zip(*pts), marker="o", color=colors[mode], label=f"{mode} (achieved)")
    right.plot(ks, ks, color="grey", alpha=0.4, linewidth=1, label="K")
    right.set(xscale="log", yscale="log", xlabel="K (questions per context)",
              ylabel="speedup over sequential", title="Speedup over one question at a time")
    right.set_xticks(ks, [str(k) for k in ks])
    right.grid(alpha=0.3, which="both")
    right.legend()
    w = report["workload"]
    fig.suptitle(f"{env['model']} ({env['parameters'] / 1e6:.1f}M), {env['threads']} thread(s), "
                 f"N={w['context_tokens']}, q={w['question_tokens']}, T={w['new_tokens']}, "
                 f"{'CPU' if cpu else 'wall'} time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

def bench_model(run, cfg: BenchConfig):
    """The benchmarked model (eval mode) and its tokenizer (None for a random preset)."""
    torch.manual_seed(cfg.seed)
    if cfg.model:
        preset = models.load_preset(cfg.model)
        if preset.get("arch") == "hub":
            model, tokenizer = models.load_model(preset)
        else:
            if preset.get("tokenizer") is not None:
                preset.tokenizer.path = None  # random weights: the preset's vocab_size
            model, tokenizer = models.build_model(preset)
        name = cfg.model
    else:
        model, tokenizer = models.load_model(run.model)
        name = run.model.path or run.model.hub_id or run.model.name
    return model.eval(), tokenizer, str(name)


def run_benchmarks(run, run_dir: Path, cfg=None) -> dict:
    """stage=bench: every measurement of the module docstring; writes bench.json/.md/.png."""
    import transformers

    bcfg: BenchConfig = run.bench.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if bcfg.threads > 0:
        torch.set_num_threads(bcfg.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    model, tokenizer, name = bench_model(run, bcfg)
    vocab = int(model.config.vocab_size)
    settings = columnar_settings(model) or {}
    stride = int(settings.get("branch_stride", run.collator.branch_stride))
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    decode_cfg = DecodeConfig(max_new_tokens=bcfg.new_tokens, ignore_eos=True).validate("bench")
    decoder = Decoder(model=model, branch_stride=stride, align_to=run.collator.align_to,
                      pad_id=pad if pad is not None else 0, eos_id=eos, decode=decode_cfg)
    log.info("bench: %s (%.2fM parameters), %d thread(s), K in %s, modes %s", name,
             models.count_parameters(model) / 1e6, torch.get_num_threads(), list(bcfg.branches),
             list(bcfg.modes))
    clock = resolve_clock(bcfg.clock, torch.get_num_threads())
    workload = make_workload(bcfg, vocab)
    rows, limits, speed, bare = bench_decoding(decoder, workload, bcfg, vocab, clock)
    report = {
        "environment": {
            "model": name, "parameters": models.count_parameters(model),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "ratio_clock": clock,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(next(model.parameters()).device), "load_before": list(load_before),
        },
        "workload": {k: v for k, v in asdict(bcfg).items()
                     if k in ("contexts", "context_tokens", "question_tokens", "new_tokens",
                              "repeats", "warmup", "branches", "modes", "seed")},
        "decode": rows,
        "decode_limit": limits,
        "speedup": speed,
        "bare_forwards": bare,
    }
    if bcfg.train:
        report["training"] = bench_training(model, bcfg, stride, vocab, clock)
        report["train_overhead"] = report["training"]["train_overhead"]
        log.info("training step: columnar / causal = %.2f", report["train_overhead"])
    report["masks"] = bench_masks(bcfg) if bcfg.mask_lengths else []
    from .bench import layout_throughput

    report["collator_tokens_per_s"] = layout_throughput(
        bcfg.collator_samples, bcfg.collator_branches, bcfg.collator_tokens,
        repeats=bcfg.collator_repeats, seed=bcfg.seed)
    report["environment"]["load_after"] = list(os.getloadavg())
    report["environment"]["bench_s"] = time.perf_counter() - started
    report["targets"] = check_targets(report, bcfg)
    markdown = format_markdown(report)
    (run_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (run_dir / "bench.md").write_text(markdown)
    if bcfg.plot:
        plot_report(report, run_dir / "bench.png")
    _track(run, run_dir, cfg, report)
    print(markdown)
    log.info("wrote %s, bench.md%s in %.0f s", run_dir / "bench.json",
             ", bench.png" if bcfg.plot else "", report["environment"]["bench_s"])
    return report


def _track(run, run_dir: Path, cfg, report: dict) -> None:
    """Headline figures to metrics.jsonl (and wandb when the logger is on)."""
    from omegaconf import OmegaConf

    from .tracking import Tracker

    flat = {f"bench/{r['mode']}/K{r['branches']}/questions_per_s": r["questions_per_s"]
            for r in report["decode"]}
    flat.update({f"bench/limit/K{k}": v for k, v in report["decode_limit"].items()})
    flat.update({f"bench/achieved/K{k}": s["achieved"] for k, s in report["speedup"].items()
                 if s["achieved"] is not None})
    if "train_overhead" in report:
        flat["bench/train_overhead"] = report["train_overhead"]
    flat["bench/collator_tokens_per_s"] = report["collator_tokens_per_s"]
    config = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None
    with Tracker(run_dir, logger_cfg=run.logger, config=config, job_type="bench",
                 name=run.logger.name or "bench", group=run.logger.group) as tracker:
        tracker.log(flat)
        tracker.summary(flat)
