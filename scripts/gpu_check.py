"""One command for a CUDA machine: the tests marked ``cuda``, then ``stage=bench`` on the GPU.

    python scripts/gpu_check.py [--out runs/gpu_check/<time>] [--budget 600]   (or: make gpu-check)

Runs ``pytest -m cuda`` (FlexAttention vs the sdpa bool mask in training and column-step
decoding, bf16 training with padded rows, FSDP through accelerate trained, saved and resumed,
evaluation sharded over every GPU), then the speed benchmark on the GPU, and prints one summary
table: every check, its result and its time, then the benchmark's absolute times.

Exit codes: 0 every check passed; 1 a check failed, errored, was skipped on a CUDA machine or
ran out of time; 3 no CUDA device (nothing is run: the table lists what would run).
Invariant: a check is reported as passed only if it ran and passed here; nothing is assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_FAILED, EXIT_NO_CUDA = 1, 3
TESTS = "tests/test_cuda.py"
# The benchmark's workload here: the default grid (both models, every N, K and mode).
BENCH_ARGS = ["stage=bench", "logger.mode=disabled"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "PYTHONPATH": str(ROOT)}


def cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def collect_tests() -> list[str]:
    """The ids of the tests marked ``cuda`` (collected, not run)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda",
                          TESTS], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return [line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line]


def run_tests(budget_s: float) -> list[dict]:
    """``pytest -m cuda``: one row per test (check, result, seconds, detail)."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "cuda.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", TESTS, "-p",
               "no:cacheprovider", f"--junitxml={junit}"]
        try:
            subprocess.run(cmd, cwd=ROOT, env=ENV, timeout=budget_s)
        except subprocess.TimeoutExpired:
            return [{"check": "pytest -m cuda", "result": "TIMEOUT", "s": budget_s,
                     "detail": f"not finished within {budget_s:.0f} s"}]
        if not junit.is_file():
            return [{"check": "pytest -m cuda", "result": "ERROR", "s": 0.0,
                     "detail": "pytest wrote no report"}]
        return [_row(case) for case in ET.parse(junit).getroot().iter("testcase")]


def _row(case) -> dict:
    result, detail = "passed", ""
    for kind, name in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "SKIPPED")):
        node = case.find(kind)
        if node is not None:
            result = name
            detail = (node.get("message") or "").splitlines()[0][:100] if node.get("message") \
                else ""
            break
    return {"check": case.get("name"), "result": result, "s": float(case.get("time", 0)),
            "detail": detail}


def run_bench(out_dir: Path, budget_s: float) -> tuple[dict, dict | None]:
    """``stage=bench`` on the GPU into ``out_dir``: its summary row and its bench.json."""
    start = time.perf_counter()
    cmd = [sys.executable, "run.py", *BENCH_ARGS, f"hydra.run.dir={out_dir}"]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=budget_s)
    except subprocess.TimeoutExpired:
        return {"check": "stage=bench", "result": "TIMEOUT", "s": budget_s,
                "detail": f"not finished within {budget_s:.0f} s"}, None
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1][:100]
        return {"check": "stage=bench", "result": "FAILED", "s": seconds, "detail": last}, None
    report = json.loads((out_dir / "bench.json").read_text())
    device = report["environment"]["device"]
    if not device.startswith("cuda"):
        return {"check": "stage=bench", "result": "FAILED", "s": seconds,
                "detail": f"ran on {device}, not on the GPU"}, report
    return {"check": "stage=bench", "result": "passed", "s": seconds,
            "detail": f"{out_dir / 'bench.md'}"}, report


def table(rows: list[dict]) -> str:
    lines = ["| check | result | s | detail |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['result']} | {r['s']:.1f} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


def bench_table(report: dict) -> str:
    """Absolute times per model, N, K and mode: questions/s, ms per context, forward calls."""
    lines = ["| model | N | K | mode | questions/s | ms per context | forward calls per context |",
             "|---|---|---|---|---|---|---|"]
    for r in report["decode"]:
        if "skipped" in r:
            continue
        lines.append(f"| {r['model']} | {r['context_tokens']} | {r['branches']} | {r['mode']} | "
                     f"{r['questions_per_s']:.1f} | "
                     f"{1000 * r['wall_s'] / max(r['contexts'], 1):.1f} | "
                     f"{r['forward_calls']:.0f} |")
    for t in report.get("training", []):
        lines.append(f"\ntraining step at L={t['length']}: columnar "
                     f"{1000 * t['columnar_step_s']:.1f} ms, causal "
                     f"{1000 * t['causal_step_s']:.1f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="where stage=bench writes (default runs/gpu_check/<time>)")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds for everything (default 600)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    devices = cuda_devices()
    if not devices:
        rows = [{"check": name, "result": "not run", "s": 0.0, "detail": "no CUDA device"}
                for name in [*collect_tests(), "stage=bench"]]
        print(table(rows))
        print("\nno CUDA device: nothing run (the CPU counterparts run in the test suite, "
              "e.g. tests/test_multiprocess.py -m slow)")
        return EXIT_NO_CUDA
    print(f"CUDA devices: {', '.join(devices)}", flush=True)
    out_dir = args.out or ROOT / "runs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    rows = run_tests(budget_s=args.budget * 0.75)
    left = args.budget - (time.perf_counter() - started)
    if left > 30:
        bench_row, report = run_bench(out_dir, left)
    else:
        bench_row, report = {"check": "stage=bench", "result": "TIMEOUT", "s": 0.0,
                             "detail": "no time left"}, None
    rows.append(bench_row)
    print("\n" + table(rows))
    if report is not None and bench_row["result"] == "passed":
        print("\n" + bench_table(report))
    bad = [r for r in rows if r["result"] != "passed"]
    total = time.perf_counter() - started
    print(f"\n{len(rows) - len(bad)} of {len(rows)} checks passed in {total:.0f} s on "
          f"{len(devices)} GPU(s)" + (f"; not passed: {', '.join(r['check'] for r in bad)}"
                                      if bad else ""))
    return EXIT_FAILED if bad else 0


if __name__ == "__main__":
    sys.exit(main())
