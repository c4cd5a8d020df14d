"""``stage=bench``: load each model, run every measurement, write bench.json / bench.md / bench.png.

Invariant: every figure that is compared with another is measured in this one run, on the same
model, the same tokens and the same thread count (pinned with ``torch.set_num_threads`` and
reported), with warm-up excluded (see :mod:`paradec.bench`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import models
from ..config import BenchConfig, DecodeConfig
from ..rope import columnar_settings
from .clocks import CPU, WALL, resolve_clock
from .decode import Decoder, bench_grid, bench_samples, first_k, make_contexts, plan_jobs, time_jobs
from .memory import bench_masks, layout_throughput
from .report import check_targets, format_markdown, plot_report
from .roofline import ModelCosts, measure_machine
from .training_step import bench_training

log = logging.getLogger(__name__)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench_model(run, preset_name: str | None):
    """``(model in eval mode on the GPU if there is one, tokenizer or None, name, weights)`` for
    a preset name (None = the composed ``model`` group). ``weights`` says what the weights are:
    random, or the checkpoint's."""
    model, tokenizer, name, weights = _load(run, preset_name)
    return model.eval().to(DEVICE), tokenizer, name, weights


def _load(run, preset_name: str | None):
    torch.manual_seed(run.bench.seed)
    if preset_name is None:
        model, tokenizer = models.load_model(run.model)
        name = run.model.path or run.model.hub_id or run.model.name
        return model, tokenizer, str(name), "checkpoint"
    return preset_model(preset_name)


def preset_model(preset_name: str):
    """``(model, tokenizer or None, name, weights)`` of a ``conf/model`` preset: a from-scratch
    preset with random weights; a Hub preset from its checkpoint, or, when that cannot load and
    the preset states ``random_arch``, random weights of its architecture (for speed the values
    of the weights do not matter)."""
    preset = models.load_preset(preset_name)
    if preset.arch != models.HUB:
        preset.tokenizer.path = None  # random weights: the preset's vocab_size
        model, tokenizer = models.build_model(preset)
        return model, tokenizer, preset_name, "random"
    try:
        model, tokenizer = models.load_model(preset)
        return model, tokenizer, preset_name, "checkpoint"
    except (ValueError, OSError) as err:
        if preset.random_arch is None:
            raise
        log.warning("bench: %s did not load (%s); timing random weights of its architecture",
                    preset_name, str(err).splitlines()[0])
        shape = dataclasses.replace(preset, arch=preset.random_arch)
        shape.tokenizer.path = None
        model, _ = models.build_model(shape)
        return model, None, preset_name, "random (checkpoint not available)"


def _data_samples(run, tokenizer, n: int):
    """The first ``n`` contexts of the composed data task's eval split, with all their
    questions (``collator.branches_per_sample`` per sample at most), as evaluation reads them."""
    from ..evaluation import first_contexts
    from ..tasks import load_task

    task = load_task(run.data)
    if "qa" not in task.kinds:
        raise ValueError(f"bench.data_contexts: data={run.data.name} has no questions")
    dataset = task.dataset(run.eval.split, tokenizer, "qa", run.collator.max_branches)
    return first_contexts(dataset, n, run.eval.context_stride)


def run_benchmarks(run, run_dir: Path, cfg=None) -> dict:
    """stage=bench: every measurement of the module docstring; writes bench.json/.md/.png."""
    import transformers

    bcfg: BenchConfig = run.bench  # validated with the whole config (paradec.config.to_run_config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if bcfg.threads > 0:
        torch.set_num_threads(bcfg.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    clock = resolve_clock(bcfg.clock, torch.get_num_threads(), gpu=DEVICE == "cuda")
    machine = (measure_machine(CPU if clock == "cpu" else WALL, DEVICE) if bcfg.roofline
               else None)
    decode_cfg = DecodeConfig(max_new_tokens=bcfg.new_tokens, ignore_eos=True).validate("bench")
    report = {
        "environment": {
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": DEVICE,
            "ratio_clock": clock, "torch": torch.__version__,
            "transformers": transformers.__version__, "load_before": list(load_before),
            "machine": machine.as_dict() if machine else None,
        },
        "workload": {k: v for k, v in asdict(bcfg).items()
                     if k in ("contexts", "context_lengths", "question_tokens", "new_tokens",
                              "repeats", "warmup", "branches", "modes", "seed",
                              "single_questions", "max_cell_tokens", "data_contexts")},
        "models": {}, "decode": [], "bare_limit": {}, "data": [], "training": [],
    }
    names = list(bcfg.models) or [None]
    cells = len(bcfg.context_lengths) * len(bcfg.branches)
    total = len(names) * cells + (len(bcfg.train_lengths) if bcfg.train else 0)
    with tqdm(total=total, desc="bench", dynamic_ncols=True,
              disable=not run.trainer.progress) as progress:
        for index, preset_name in enumerate(names):
            model, tokenizer, name, weights = bench_model(run, preset_name)
            vocab = int(model.config.vocab_size)
            settings = columnar_settings(model) or {}
            stride = int(settings.get("branch_stride", run.collator.branch_stride))
            pad = getattr(tokenizer, "pad_token_id", None)
            decoder = Decoder(model=model, collator=dataclasses.replace(
                run.collator, branch_stride=stride), pad_id=pad if pad is not None else 0,
                eos_id=getattr(tokenizer, "eos_token_id", None), decode=decode_cfg)
            costs = ModelCosts.of(model)
            report["models"][name] = {
                "parameters": models.count_parameters(model), "weights": weights,
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "costs": asdict(costs)}
            log.info("bench: %s (%.2fM parameters, %s weights), %d thread(s)", name,
                     models.count_parameters(model) / 1e6, weights, torch.get_num_threads())
            samples = (_data_samples(run, tokenizer, bcfg.data_contexts)
                       if bcfg.data_contexts and tokenizer is not None else None)
            _warm_up(decoder, bcfg, vocab, samples)
            rows, limits = bench_grid(decoder, bcfg, vocab, clock, costs, machine, name,
                                      progress)
            report["decode"] += rows
            report["bare_limit"].update({f"{name}/{k}": v for k, v in limits.items()})
            if samples:
                report["data"] += bench_samples(decoder, samples, bcfg, vocab, clock, costs,
                                                machine, name)
            if bcfg.train and index == 0:
                report["training"] = [{"model": name, **row} for row in bench_training(
                    model, bcfg, stride, vocab, clock, progress)]
            del model, decoder
    report["masks"] = bench_masks(bcfg) if bcfg.mask_lengths else []
    report["collator_tokens_per_s"] = layout_throughput(
        bcfg.collator_samples, bcfg.collator_branches, bcfg.collator_tokens,
        repeats=bcfg.collator_repeats, seed=bcfg.seed)
    report["environment"]["load_after"] = list(os.getloadavg())
    report["environment"]["bench_s"] = time.perf_counter() - started
    report["targets"] = check_targets(report, bcfg)
    markdown = format_markdown(report)
    (run_dir / "bench.json").write_text(json.dumps(report, indent=2))
    (run_dir / "bench.md").write_text(markdown)
    if bcfg.plot and report["decode"]:
        plot_report(report, run_dir / "bench.png")
    _track(run, run_dir, cfg, report)
    print(markdown)
    log.info("wrote %s, bench.md%s in %.0f s", run_dir / "bench.json",
             ", bench.png" if bcfg.plot else "", report["environment"]["bench_s"])
    return report


def _warm_up(decoder: Decoder, cfg: BenchConfig, vocab: int, samples=None) -> None:
    """Untimed runs of every mode on the smallest workload of the grid (or the first data
    sample when there is no grid): lazy initialisation, kernels, allocator."""
    if not cfg.warmup:
        return
    small = dataclasses.replace(cfg, contexts=1)
    if cfg.context_lengths:
        work = first_k(make_contexts(small, vocab, min(int(n) for n in cfg.context_lengths)),
                       min(int(k) for k in cfg.branches))
    elif samples:
        work = samples[:1]
    else:
        return
    time_jobs({"warm-up": plan_jobs(decoder, work, small, vocab, cfg.modes, False)},
              cfg.warmup)


def _track(run, run_dir: Path, cfg, report: dict) -> None:
    """Headline figures to metrics.jsonl (and wandb when the logger is on)."""
    from omegaconf import OmegaConf

    from ..tracking import Tracker

    flat = {}
    for r in report["decode"]:
        if "skipped" in r:
            continue
        key = f"bench/{r['model']}/N{r['context_tokens']}/K{r['branches']}/{r['mode']}"
        flat[f"{key}/questions_per_s"] = r["questions_per_s"]
        if r.get("parallel_speedup") is not None:
            flat[f"{key}/parallel_speedup"] = r["parallel_speedup"]
    for row in report["training"]:
        flat[f"bench/train/L{row['length']}/time_ratio"] = row["time_ratio"]
        if row.get("memory_ratio") is not None:
            flat[f"bench/train/L{row['length']}/memory_ratio"] = row["memory_ratio"]
    flat["bench/collator_tokens_per_s"] = report["collator_tokens_per_s"]
    config = OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None
    with Tracker(run_dir, logger_cfg=run.logger, config=config, job_type="bench",
                 name=run.logger.name or "bench", group=run.logger.group) as tracker:
        tracker.log(flat)
        tracker.summary(flat)
