"""The benchmark's report: its speed targets, bench.md and bench.png.

Invariant: the report only reads what :mod:`paradec.bench.stage` measured; a target is met,
missed or ``None`` (not measured in this run), never estimated.
"""

from __future__ import annotations

from pathlib import Path

from ..config import BENCH_MODES, BenchConfig

# Speed targets on a CPU, checked and reported in bench.json / bench.md.
TARGET_LIMIT_FRACTION = 0.85   # parallel reaches this fraction of its limit at every K >= 2
TARGET_VS_BATCHED = 1.5        # parallel / batched questions per second at the reference K
TARGET_KV_FRACTION = 0.25      # parallel / batched peak KV tokens at the reference K
TARGET_TRAIN_OVERHEAD = 1.3    # columnar / plain causal training step
REFERENCE_K = 8


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
              "| K | limit | achieved | achieved / limit | limit (wall) | achieved (wall) | "
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
