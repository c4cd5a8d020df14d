"""``stage=bench``: load the model, run every measurement, write bench.json / bench.md / bench.png.

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

from .. import models
from ..config import BenchConfig, DecodeConfig
from ..rope import columnar_settings
from .clocks import resolve_clock
from .decode import Decoder, bench_decoding, make_workload
from .memory import bench_masks, layout_throughput
from .report import check_targets, format_markdown, plot_report
from .training_step import bench_training

log = logging.getLogger(__name__)


def bench_model(run, cfg: BenchConfig):
    """The benchmarked model (eval mode) and its tokenizer (None for a random preset)."""
    torch.manual_seed(cfg.seed)
    if cfg.model:
        preset = models.load_preset(cfg.model)
        if preset.arch == models.HUB:
            model, tokenizer = models.load_model(preset)
        else:
            preset.tokenizer.path = None  # random weights: the preset's vocab_size
            model, tokenizer = models.build_model(preset)
        name = cfg.model
    else:
        model, tokenizer = models.load_model(run.model)
        name = run.model.path or run.model.hub_id or run.model.name
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.eval().to(device), tokenizer, str(name)


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
    model, tokenizer, name = bench_model(run, bcfg)
    vocab = int(model.config.vocab_size)
    settings = columnar_settings(model) or {}
    stride = int(settings.get("branch_stride", run.collator.branch_stride))
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    decode_cfg = DecodeConfig(max_new_tokens=bcfg.new_tokens, ignore_eos=True).validate("bench")
    collator = dataclasses.replace(run.collator, branch_stride=stride)
    decoder = Decoder(model=model, collator=collator, pad_id=pad if pad is not None else 0,
                      eos_id=eos, decode=decode_cfg)
    log.info("bench: %s (%.2fM parameters), %d thread(s), K in %s, modes %s", name,
             models.count_parameters(model) / 1e6, torch.get_num_threads(), list(bcfg.branches),
             list(bcfg.modes))
    clock = resolve_clock(bcfg.clock, torch.get_num_threads(), gpu=model.device.type == "cuda")
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

    from ..tracking import Tracker

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
