"""Offline reports: plots and a markdown table from a run or a sweep.

    python -m paradec.report <run or multirun sweep dir>   # report.md + PNGs in that directory

Invariant: everything here reads only what runs write to disk (``.hydra/config.yaml``,
``.hydra/overrides.yaml``, ``eval.json``, ``metrics.jsonl``), so a report needs no wandb account
and no network, and it is the same for a single run, a Hydra multirun sweep (one numbered
subdirectory per job) or a pipeline run (pretrain/ finetune/ eval/ subdirectories). Plots use
matplotlib's Agg backend (no display).

Written files:
  report.md          one row per job and mode (EM, F1, questions/s, speedup over sequential,
                     forward calls, peak KV tokens) and one row per training job (final losses);
  eval_em.png        EM per mode against branches per sample (bars per variant when the
                     branch count does not vary);
  eval_speedup.png   questions/s of each mode over ``sequential`` against branches per sample;
  eval_questions_per_s.png  questions/s of each mode against branches per sample;
  train_loss.png     training (solid) and validation (dashed) loss against the step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import MODES  # noqa: E402

MODE_ORDER = MODES
SKIP_DIRS = {"wandb", "checkpoints", "model", "model_merged", "base_model", ".hydra",
             ".submitit", "__pycache__"}
BRANCH_KEY = "collator.branches_per_sample"


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One run directory: what it was asked to do and what it wrote."""

    path: Path
    name: str                      # path relative to the report root ("." for the root itself)
    config: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    eval: Optional[dict] = None    # eval.json: mode -> metrics
    metrics: list = field(default_factory=list)  # metrics.jsonl records

    @property
    def stage(self) -> str:
        return str(_get(self.config, "stage.name") or "")

    @property
    def branches(self) -> Optional[int]:
        """Branches per sample (the most a sample can have when the count is random)."""
        top = _get(self.config, "collator.max_branches_per_sample")
        value = top if isinstance(top, int) else _get(self.config, BRANCH_KEY)
        return value if isinstance(value, int) else None

    @property
    def train_records(self) -> list:
        return [r for r in self.metrics if "step" in r and "train/loss" in r]


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _hydra_files(path: Path, root: Path) -> tuple[dict, list]:
    """``.hydra/config.yaml`` and ``overrides.yaml`` of ``path`` or its nearest parent under root
    (a pipeline's stage subdirectories share the pipeline's)."""
    from omegaconf import OmegaConf

    for here in [path, *path.parents]:
        hydra = here / ".hydra"
        if (hydra / "config.yaml").is_file():
            config = OmegaConf.to_container(OmegaConf.load(hydra / "config.yaml"), resolve=False)
            overrides = []
            if (hydra / "overrides.yaml").is_file():
                overrides = list(OmegaConf.load(hydra / "overrides.yaml") or [])
            return config, [str(o) for o in overrides]
        if here == root or here == here.parent:
            break
    return {}, []


def _read_metrics(path: Path) -> list:
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a killed run
                continue
    return records


def _sort_key(path: Path):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts]


def find_jobs(root: str | os.PathLike) -> list[Job]:
    """Every run directory under ``root`` (itself included): one with eval.json or metrics.jsonl."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    jobs = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        here = Path(here)
        if "eval.json" not in files and "metrics.jsonl" not in files:
            continue
        config, overrides = _hydra_files(here, root)
        report = None
        # A pipeline copies eval/eval.json to its top directory: count it once.
        if "eval.json" in files and not (here / "eval" / "eval.json").is_file():
            report = json.loads((here / "eval.json").read_text())
        job = Job(path=here, name=str(here.relative_to(root)), config=config,
                  overrides=overrides, eval=report, metrics=_read_metrics(here / "metrics.jsonl"))
        if here.name in ("pretrain", "finetune", "eval", "zero_shot") and job.stage == "pipeline":
            stage = "eval" if here.name == "zero_shot" else here.name
            job.config = {**config, "stage": {**config.get("stage", {}), "name": stage}}
        if job.eval is not None or job.train_records:
            jobs.append(job)
    return sorted(jobs, key=lambda j: _sort_key(j.path.relative_to(root)))


# Overrides that say where a run is or how it was started, not what was compared: they never make
# a variant (the branch count is plotted on x, the mode is the line).
NOT_A_VARIANT = (BRANCH_KEY, "hydra.run.dir", "hydra.sweep.dir", "trainer.resume", "model.path",
                 "data.path", "data.eval_path", "data.test_path", "stage", "eval.modes")


def variant_labels(jobs: Sequence[Job]) -> dict[str, str]:
    """Per job, the overrides that differ between jobs, except those in ``NOT_A_VARIANT`` and
    a pipeline's per-stage sections (so a stage=eval sweep lines up with its pipeline's eval)."""
    def items(job):
        out = {}
        for o in job.overrides:
            key, _, value = o.lstrip("+~").partition("=")
            if key not in NOT_A_VARIANT and not key.startswith("pipeline."):
                out[key] = value
        return out

    per_job = {j.name: items(j) for j in jobs}
    keys = sorted({k for d in per_job.values() for k in d})
    varying = [k for k in keys if len({d.get(k) for d in per_job.values()}) > 1]
    return {name: ",".join(f"{k.split('.')[-1]}={d.get(k, '-')}" for k in varying)
            for name, d in per_job.items()}


def _modes(jobs: Sequence[Job]) -> list[str]:
    seen = {m for j in jobs if j.eval for m in j.eval}
    return [m for m in MODE_ORDER if m in seen] + sorted(seen - set(MODE_ORDER))


def speedups(report: dict) -> dict[str, float]:
    """questions/s of each mode divided by that of ``sequential`` (empty without sequential)."""
    base = (report.get("sequential") or {}).get("questions_per_s")
    if not base:
        return {}
    return {m: row["questions_per_s"] / base for m, row in report.items()
            if row.get("questions_per_s") is not None}


# --------------------------------------------------------------------------------------------
# Plots and the markdown table
# --------------------------------------------------------------------------------------------

def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _mode_colors(modes):
    palette = plt.get_cmap("tab10")
    fixed = {m: palette(i) for i, m in enumerate(MODE_ORDER)}
    return {m: fixed.get(m, palette(4 + i)) for i, m in enumerate(modes)}


def _eval_series(jobs, labels, key: Callable[[Job, str], Optional[float]], modes):
    """{(mode, variant): [(branches, value), ...]} over the evaluated jobs."""
    series: dict = {}
    for job in jobs:
        if job.eval is None:
            continue
        for mode in modes:
            value = key(job, mode)
            if value is not None:
                x = job.branches if job.branches is not None else 0
                series.setdefault((mode, labels[job.name]), []).append((x, value))
    return {k: sorted(v) for k, v in series.items()}


def _plot_eval(jobs, labels, modes, metric: str, ylabel: str, title: str, path: Path,
               hline: Optional[float] = None) -> Optional[Path]:
    if metric == "speedup":
        def key(job, mode):
            return speedups(job.eval).get(mode) if mode != "sequential" else None
    else:
        def key(job, mode):
            return (job.eval.get(mode) or {}).get(metric)
    series = _eval_series(jobs, labels, key, modes)
    if not series:
        return None
    xs = sorted({x for pts in series.values() for x, _ in pts})
    variants = sorted({v for _, v in series})
    colors = _mode_colors(modes)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if len(xs) > 1:
        for (mode, variant), pts in series.items():
            i = variants.index(variant)
            label = mode + (f" [{variant}]" if variant else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[mode],
                    linestyle=styles[i % len(styles)], marker=markers[i % len(markers)],
                    label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("branches per sample (collator.branches_per_sample)")
    else:  # one branch count: bars per variant and mode
        plotted = [m for m in modes if any(k[0] == m for k in series)]
        width = 0.8 / max(len(plotted), 1)
        for i, mode in enumerate(plotted):
            vals = [dict(series.get((mode, v), [(None, float("nan"))]))
                    .get(xs[0], float("nan")) for v in variants]
            ax.bar([j + i * width for j in range(len(variants))], vals, width=width,
                   color=colors[mode], label=mode)
        ax.set_xticks([j + width * (len(plotted) - 1) / 2 for j in range(len(variants))])
        ax.set_xticklabels([v or "(run)" for v in variants], rotation=30, ha="right",
                           fontsize=8)
        ax.set_xlabel(f"variant (branches per sample = {xs[0]})")
    if hline is not None:
        ax.axhline(hline, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_losses(jobs, labels, path: Path) -> Optional[Path]:
    trained = [j for j in jobs if j.train_records]
    if not trained:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    palette = plt.get_cmap("tab10" if len(trained) <= 10 else "tab20")
    for i, job in enumerate(trained):
        by_step = {}
        for r in job.train_records:  # the last record of a step wins (a resumed run)
            by_step[r["step"]] = r
        steps = sorted(by_step)
        label = " ".join(filter(None, [job.name if job.name != "." else job.stage,
                                       f"K={job.branches}" if job.branches else "",
                                       labels.get(job.name, "")]))
        color = palette(i % palette.N)
        ax.plot(steps, [by_step[s]["train/loss"] for s in steps], color=color, label=label)
        val = [(s, by_step[s]["val/loss"]) for s in steps if "val/loss" in by_step[s]]
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], color=color, linestyle="--",
                    marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title("training loss (solid) and validation loss (dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=1 if len(trained) <= 8 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_report(jobs: Sequence[Job], root: Path, images: Sequence[Path] = ()) -> str:
    labels = variant_labels(jobs)
    modes = _modes(jobs)
    lines = [f"# paradec report: {root}", "",
             f"{len(jobs)} run(s); written by `python -m paradec.report {root}`.", ""]
    evaluated = [j for j in jobs if j.eval is not None]
    if evaluated:
        lines += ["## Evaluation", "",
                  "Speedup = questions/s of the mode / questions/s of `sequential` in the same run.",
                  "",
                  "| run | branches | variant | mode | questions | EM | F1 | questions/s | speedup "
                  "| forward calls | peak KV tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for job in evaluated:
            ups = speedups(job.eval)
            for mode in [m for m in modes if m in job.eval]:
                row = job.eval[mode]
                lines.append("| " + " | ".join([
                    job.name, _fmt(job.branches), labels[job.name] or "-", mode,
                    _fmt(row.get("n_questions")), _fmt(row.get("em")), _fmt(row.get("f1")),
                    _fmt(row.get("questions_per_s"), 1), _fmt(ups.get(mode), 2),
                    _fmt(row.get("forward_calls")), _fmt(row.get("peak_kv_tokens"))]) + " |")
        lines.append("")
    trained = [j for j in jobs if j.train_records]
    if trained:
        lines += ["## Training", "",
                  "| run | stage | branches | variant | steps | final train loss | final val loss "
                  "| mean tokens/s |", "|---|---|---|---|---|---|---|---|"]
        for job in trained:
            recs = job.train_records
            val = [r["val/loss"] for r in recs if "val/loss" in r]
            tps = [r["train/tokens_per_s"] for r in recs if "train/tokens_per_s" in r]
            lines.append("| " + " | ".join([
                job.name, job.stage or "-", _fmt(job.branches), labels[job.name] or "-",
                _fmt(max(r["step"] for r in recs)), _fmt(recs[-1]["train/loss"], 4),
                _fmt(val[-1] if val else None, 4),
                _fmt(sum(tps) / len(tps) if tps else None, 0)]) + " |")
        lines.append("")
    if images:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    return "\n".join(lines)


def write_report(root: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
    """Read every run under ``root``; write report.md and the PNGs into ``out_dir`` (= root)."""
    root = Path(root).resolve()
    out = Path(out_dir).resolve() if out_dir else root
    out.mkdir(parents=True, exist_ok=True)
    jobs = find_jobs(root)
    if not jobs:
        raise FileNotFoundError(f"no eval.json or metrics.jsonl with training steps under {root}")
    labels = variant_labels(jobs)
    modes = _modes(jobs)
    images = [p for p in (
        _plot_eval(jobs, labels, modes, "em", "exact match", "EM per mode", out / "eval_em.png"),
        _plot_eval(jobs, labels, modes, "speedup", "questions/s over sequential",
                   "speedup over one question per sample (sequential)",
                   out / "eval_speedup.png", hline=1.0),
        _plot_eval(jobs, labels, modes, "questions_per_s", "questions/s",
                   "questions answered per second", out / "eval_questions_per_s.png"),
        _plot_losses(jobs, labels, out / "train_loss.png"),
    ) if p is not None]
    report = out / "report.md"
    report.write_text(markdown_report(jobs, root, images), encoding="utf-8")
    return {"report": report, "images": images, "jobs": jobs}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paradec.report",
        description="Plots and a markdown table from a run or a multirun sweep directory "
                    "(offline). A picture of a layout: python -m paradec.viz.")
    parser.add_argument("path", help="a run dir or a multirun sweep dir")
    parser.add_argument("--out", help="write into this directory instead of PATH")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.path, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["report"].read_text())
    for image in result["images"]:
        print(f"wrote {image}")
    print(f"wrote {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
