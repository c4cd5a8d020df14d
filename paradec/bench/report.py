"""The benchmark's report: its targets, bench.md and bench.png.

Invariant: the report only reads what :mod:`paradec.bench.stage` measured; a target is met,
missed or ``None`` (not measured in this run), never estimated.
"""

from __future__ import annotations

from pathlib import Path

from ..config import BENCH_MODES, BenchConfig

# Targets on a CPU, checked per model and reported in bench.json / bench.md.
LONG_CONTEXT, SHORT_CONTEXT, REFERENCE_K = 4096, 256, 8
TARGET_VS_PREFIX_LONG = 2.0    # parallel / prefix questions per second at N=4096, K=8
TARGET_VS_PREFIX_SHORT = 1.0   # ... and at N=256, every K: never slower
TARGET_STEP_FRACTION = 0.5     # parallel's decode steps reach this fraction of the machine limit at N=4096
TARGET_TRAIN_TIME = 1.15       # columnar / causal training step time at L=4096
TARGET_TRAIN_MEMORY = 1.25     # ... and peak resident memory
TRAIN_REFERENCE_LENGTH = 4096


def _rows(report: dict, model: str, mode: str, **where) -> list[dict]:
    return [r for r in report["decode"] if r["model"] == model and r["mode"] == mode
            and "skipped" not in r and all(r[k] == v for k, v in where.items())]


def _target(rule: str, value, met) -> dict:
    return {"rule": rule, "value": value, "met": met}


def check_targets(report: dict, cfg: BenchConfig) -> dict:
    """Each target, per model: its value and whether it is met (None = not measured)."""
    targets = {}
    T, q = cfg.new_tokens, cfg.question_tokens
    for model in report["models"]:
        prefix = {(r["context_tokens"], r["branches"]): r for r in _rows(report, model, "prefix")}
        par = _rows(report, model, "parallel")
        long = prefix.get((LONG_CONTEXT, REFERENCE_K), {})
        vs_long = long.get("parallel_speedup")
        targets[f"{model}/vs_prefix_long"] = _target(
            f"parallel >= {TARGET_VS_PREFIX_LONG}x prefix questions/s at N={LONG_CONTEXT}, "
            f"K={REFERENCE_K} (steps alone: {_fmt(long.get('parallel_step_speedup'), 2)}x)",
            vs_long, None if vs_long is None else vs_long >= TARGET_VS_PREFIX_LONG)
        short = [r["parallel_speedup"] for (n, _), r in prefix.items() if n == SHORT_CONTEXT]
        targets[f"{model}/vs_prefix_short"] = _target(
            f"parallel >= {TARGET_VS_PREFIX_SHORT}x prefix questions/s at N={SHORT_CONTEXT}, "
            "every K (the lowest)", min(short) if short else None,
            min(short) >= TARGET_VS_PREFIX_SHORT if short else None)
        over = [r for r in par if r["peak_kv_tokens"] > r["context_tokens"]
                + r["branches"] * (q + T)]
        targets[f"{model}/peak_kv"] = _target(
            "parallel peak KV tokens <= N + K(q + T) per context at every N, K",
            max((r["peak_kv_tokens"] for r in par), default=None),
            None if not par else not over)
        steps = [r["steps_limit_fraction"] for r in par if r["context_tokens"] == LONG_CONTEXT
                 and r.get("steps_limit_fraction") is not None]
        targets[f"{model}/step_bandwidth"] = _target(
            f"parallel decode steps >= {TARGET_STEP_FRACTION} of the machine limit at "
            f"N={LONG_CONTEXT} (the lowest over K)", min(steps) if steps else None,
            min(steps) >= TARGET_STEP_FRACTION if steps else None)
        calls = sorted({r["forward_calls"] for r in par})
        targets[f"{model}/forward_calls"] = _target(
            f"parallel forward calls per context == 1 + {T - 1} at every N, K", calls or None,
            calls == [T] if calls else None)
    for row in report["training"]:
        if row["length"] != TRAIN_REFERENCE_LENGTH:
            continue
        targets[f"{row['model']}/train_time"] = _target(
            f"columnar training step <= {TARGET_TRAIN_TIME}x the time of a causal step at "
            f"L={TRAIN_REFERENCE_LENGTH}", row["time_ratio"],
            row["time_ratio"] <= TARGET_TRAIN_TIME)
        memory = row.get("memory_ratio")
        targets[f"{row['model']}/train_memory"] = _target(
            f"columnar training step <= {TARGET_TRAIN_MEMORY}x the peak resident memory of a "
            f"causal step at L={TRAIN_REFERENCE_LENGTH}", memory,
            None if memory is None else memory <= TARGET_TRAIN_MEMORY)
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


def _qps(row: dict, clock: str) -> float:
    return row["questions_per_cpu_s"] if clock == "cpu" else row["questions_per_s"]


def _grid_tables(report: dict, model: str, per_s: str, clock: str) -> list[str]:
    """The N x K tables of one model: parallel's speedups, then every run."""
    w = report["workload"]
    lines = ["", f"Parallel's speedup over each mode ({per_s}, per question; in brackets: the "
              "decode steps alone, after the first new token):", "",
              "| N | K | parallel " + per_s + " | " + " | ".join(
                  f"x {m}" for m in w["modes"] if m != "parallel") + " |",
              "|---|---|---|" + "---|" * (len(w["modes"]) - 1)]
    cells = {}
    for r in report["decode"]:
        if r["model"] == model:
            cells.setdefault((r["context_tokens"], r["branches"]), {})[r["mode"]] = r
    for (N, K), by_mode in cells.items():
        par = by_mode.get("parallel", {})
        out = []
        for m in w["modes"]:
            if m == "parallel":
                continue
            r = by_mode.get(m, {})
            out.append("skipped" if "skipped" in r else
                       f"{_fmt(r.get('parallel_speedup'), 2)} "
                       f"({_fmt(r.get('parallel_step_speedup'), 2)})" if r else "-")
        measured = "mode" in par and "skipped" not in par
        lines.append(f"| {N} | {K} | {_fmt(_qps(par, clock), 2) if measured else '-'} | "
                     + " | ".join(out) + " |")
    lines += ["", "Every run: time to the first new token (prefill), per decode step, forward "
              "calls and peak KV-cache tokens per context, and the fraction of the machine "
              "limit reached (whole decode / steps):", "",
              f"| N | K | mode | {per_s} | prefill s | step ms | forwards | peak KV | "
              "limit fraction |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["decode"]:
        if r["model"] != model or "skipped" in r:
            continue
        lines.append(
            f"| {r['context_tokens']} | {r['branches']} | {r['mode']} | "
            f"{_fmt(_qps(r, clock), 2)} | {_fmt(r['prefill_s'], 3)} | "
            f"{_fmt(r['step_ms'], 1)} | {_fmt(r['forward_calls'], 0)} | "
            f"{r['peak_kv_tokens']} | {_fmt(r.get('limit_fraction'), 2)} / "
            f"{_fmt(r.get('steps_limit_fraction'), 2)} |")
    return lines


def _bare_and_data_tables(report: dict, model: str, per_s: str, clock: str) -> list[str]:
    """One model's bare-forward limit and real-length (data task) tables."""
    lines = []
    limits = [v for v in report["bare_limit"].values() if v["model"] == model]
    if limits:
        lines += ["", "Parallel over sequential against the bare-forward limit (the same "
                  "model forwards with no decoder logic: K x one question / parallel):", "",
                  "| N | K | limit | achieved | achieved / limit |", "|---|---|---|---|---|"]
        for v in limits:
            lines.append(f"| {v['context_tokens']} | {v['branches']} | {_fmt(v['limit'], 2)}"
                         f" | {_fmt(v.get('achieved'), 2)} | {_fmt(v.get('fraction'), 2)} |")
    data = [r for r in report["data"] if r["model"] == model]
    if data:
        d = data[0]
        lines += ["", f"Real lengths ({d['contexts']} samples of the data task: its contexts, "
                  f"mean {d['context_tokens']} tokens, with up to {d['branches']} of their "
                  f"questions each, mean {d['question_tokens']} tokens; times summed over "
                  "the samples):", "",
                  f"| mode | {per_s} | x parallel's speed (steps) | prefill s | step ms | "
                  "forwards / context | peak KV |", "|---|---|---|---|---|---|---|"]
        for r in data:
            lines.append(f"| {r['mode']} | {_fmt(_qps(r, clock), 2)} | "
                         f"{_fmt(r.get('parallel_speedup'), 2)} "
                         f"({_fmt(r.get('parallel_step_speedup'), 2)}) | "
                         f"{_fmt(r['prefill_s'], 3)} | {_fmt(r['step_ms'], 1)} | "
                         f"{_fmt(r['forward_calls'], 1)} | {r['peak_kv_tokens']} |")
    return lines


def format_markdown(report: dict) -> str:
    """The whole report as markdown (bench.md)."""
    env, w = report["environment"], report["workload"]
    clock = env["ratio_clock"]
    per_s = "questions per CPU-second" if clock == "cpu" else "questions/s"
    clock_note = ("process CPU time (one thread: time the core was taken by other processes "
                  "does not count)" if clock == "cpu" else "wall time")
    machine = env.get("machine")
    lines = [
        f"# paradec bench: {', '.join(report['models'])}; {env['threads']} thread(s)", "",
        (f"Decoding grid: N in {w['context_lengths']} context tokens x K in {w['branches']} "
         f"questions of {w['question_tokens']} tokens, {w['contexts']} context(s) per (N, K), "
         if w["context_lengths"] else "Decoding: no N x K grid in this run, ")
        + f"{w['new_tokens']} new tokens per answer (EOS ignored), greedy. {w['repeats']} "
        f"repeat(s) after {w['warmup']} warm-up; in each repeat the modes take turns on every "
        f"context. Ratios are medians of these side-by-side pairs, on {clock_note}; both clocks "
        f"are in bench.json. sequential answers the first {w['single_questions']} question(s) "
        "of each context (one at a time, its cost per question does not depend on K), and every "
        "figure of it is per question. A mode that would prefill more than "
        f"{w['max_cell_tokens']} tokens per context is skipped (listed below). torch "
        f"{env['torch']}, transformers {env['transformers']}, {env['cpu_count']} CPU(s), "
        f"{env['device']}, load average {env['load_before'][0]:.2f} before / "
        f"{env['load_after'][0]:.2f} after, {env['bench_s'] / 60:.1f} min in all.",
    ]
    if machine:
        lines += ["", f"Machine ({machine['threads']} thread(s)): read bandwidth "
                  f"{machine['read_bytes_per_s'] / 1e9:.1f} GB/s, copy "
                  f"{machine['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), fp32 matmul "
                  f"{machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s. A mode's limit is the sum "
                  "over its forwards of max(bytes it must read / bandwidth, flops / matmul "
                  "throughput): the weights once per forward plus the KV cache it attends "
                  "(paradec/bench/roofline.py)."]
    for model, info in report["models"].items():
        lines += ["", f"## {model}", "",
                  f"{info['parameters'] / 1e6:.1f}M parameters ({info['weights']} weights), "
                  f"{info['attn_implementation']}, {info['dtype']}."]
        if any(r["model"] == model for r in report["decode"]):
            lines += _grid_tables(report, model, per_s, clock)
        lines += _bare_and_data_tables(report, model, per_s, clock)
    skipped = [r for r in report["decode"] if "skipped" in r]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(
            f"{r['model']} N={r['context_tokens']} K={r['branches']} {r['mode']}"
            for r in skipped) + f" (each {skipped[0]['skipped'].split(' per context')[0]} "
            "or more per context)."]
    if report["training"]:
        t0 = report["training"][0]
        lines += ["", "## Training step at long lengths", "",
                  f"{t0['model']}, one sample of L tokens ({t0['branches']} branches after a "
                  f"background of L/4), {t0['attn_implementation']}; forward + loss + backward + "
                  f"AdamW step ({t0['clock']} s). Peak = the process's resident high-water mark "
                  "during the step (model, gradients and optimizer state included); increase = "
                  "over the resident memory right before it.", "",
                  "| L | columnar s | causal s | time ratio | columnar peak | causal peak | "
                  "peak ratio | increase ratio |", "|---|---|---|---|---|---|---|---|"]
        for t in report["training"]:
            lines.append(f"| {t['length']} | {_fmt(t['columnar_step_s'], 2)} | "
                         f"{_fmt(t['causal_step_s'], 2)} | {_fmt(t['time_ratio'], 2)} | "
                         f"{_mib(t.get('columnar_peak_rss'))} | {_mib(t.get('causal_peak_rss'))}"
                         f" | {_fmt(t.get('memory_ratio'), 2)} | "
                         f"{_fmt(t.get('increase_ratio'), 2)} |")
    if report.get("masks"):
        lines += ["", "## Mask memory", "",
                  "| L | dense bool [1,1,L,L] | dense float32 | flex BlockMask | "
                  "flex build s | flex sparsity % |", "|---|---|---|---|---|---|"]
        for m in report["masks"]:
            flex = _mib(m["flex_bytes"]) if m["flex_bytes"] is not None else (
                "unavailable" if m["flex_error"] else "-")
            lines.append(f"| {m['length']} | {_mib(m['dense_bool_bytes'])} | "
                         f"{_mib(m['dense_float32_bytes'])} | {flex} | "
                         f"{_fmt(m['flex_build_s'])} | {_fmt(m['flex_sparsity'], 1)} |")
    if report.get("collator_tokens_per_s") is not None:
        lines += ["", f"Collator: {report['collator_tokens_per_s'] / 1e6:.2f}M tokens/s."]
    measured = {name: t for name, t in report["targets"].items() if t["value"] is not None}
    lines += ["", "## Targets", ""]
    if not measured:
        return "\n".join(lines + ["None measured in this run (no decoding grid, no training "
                                  "step at the reference length)."]) + "\n"
    lines += ["| target | value | met |", "|---|---|---|"]
    for name, tgt in measured.items():
        value = tgt["value"]
        value = _fmt(value, 3) if not isinstance(value, list) else ", ".join(map(_fmt, value))
        lines.append(f"| {name.split('/')[0]}: {tgt['rule']} | {value} | {_fmt(tgt['met'])} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """bench.png, one column per model: parallel's speedup over prefix and over sequential
    against N at K = 8 (whole decode, and prefix's decode steps alone); questions/s per mode
    against K at the longest N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 2, 6: not 5x10^-1

    env, w = report["environment"], report["workload"]
    cpu = env["ratio_clock"] == "cpu"
    colors = {m: f"C{i}" for i, m in enumerate(BENCH_MODES)}  # one colour per mode
    names = list(report["models"])
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 8), squeeze=False)
    ks = sorted({r["branches"] for r in report["decode"]})
    ref_k = REFERENCE_K if REFERENCE_K in ks else max(ks)
    for col, model in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        for mode, key, style, label in (
                ("prefix", "parallel_speedup", "-", "over prefix"),
                ("prefix", "parallel_step_speedup", "--", "over prefix, decode steps"),
                ("sequential", "parallel_speedup", "-", "over sequential"),
                ("batched", "parallel_speedup", ":", "over batched")):
            pts = sorted((r["context_tokens"], r[key]) for r in _rows(report, model, mode,
                                                                        branches=ref_k)
                         if r.get(key) is not None)
            if pts:
                top.plot(*zip(*pts), marker="o", linestyle=style, color=colors[mode],
                         label=label)
        top.axhline(1, color="grey", linewidth=1, alpha=0.6)
        top.set(xscale="log", yscale="log", xlabel="N (context tokens)",
                ylabel="parallel's speedup (per question)",
                title=f"{model}: parallel at K={ref_k}")
        ns = sorted({r["context_tokens"] for r in _rows(report, model, "parallel")})
        if ns:
            top.set_xticks(ns, [str(n) for n in ns])
        top.grid(alpha=0.3, which="both")
        top.legend(fontsize=8)
        longest = max(ns) if ns else None
        for mode in w["modes"]:
            pts = sorted((r["branches"], r["questions_per_cpu_s" if cpu else "questions_per_s"])
                         for r in _rows(report, model, mode, context_tokens=longest))
            if pts:
                bottom.plot(*zip(*pts), marker="o", color=colors[mode], label=mode)
        bottom.set(xscale="log", yscale="log", xlabel="K (questions per context)",
                   ylabel="questions per CPU-second" if cpu else "questions / s",
                   title=f"{model}: N={longest}")
        bottom.set_xticks(ks, [str(k) for k in ks])
        bottom.grid(alpha=0.3, which="both")
        bottom.legend(fontsize=8)
        for ax in (top, bottom):
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(f"{env['threads']} thread(s), q={w['question_tokens']}, T={w['new_tokens']}, "
                 f"{'CPU' if cpu else 'wall'} time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
