"""stage=bench on a tiny model with tiny sizes: the report's structure and its exact counts.

Timings are never asserted (the machine is shared and noisy); forward calls and KV-cache sizes
are exact, so they are.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from paradec.bench.stage import run_benchmarks
from paradec.config import BenchConfig, register_configs, to_run_config
from paradec.masks import flex_block_mask

ROOT = Path(__file__).resolve().parents[1]
N, Q, T = 20, 4, 5  # context tokens, question tokens, new tokens
TINY = ["stage=bench", "bench.model=tiny", "bench.branches=[1,2]", "bench.contexts=2",
        f"bench.context_tokens={N}", f"bench.question_tokens={Q}", f"bench.new_tokens={T}",
        "bench.repeats=1", "bench.warmup=0", "bench.train_batch=1", "bench.train_branches=2",
        "bench.train_branch_tokens=8", "bench.train_background_tokens=8",
        "bench.train_repeats=1", "bench.mask_lengths=[64,256]", "bench.collator_repeats=1",
        "bench.collator_samples=2", "bench.collator_branches=2", "bench.collator_tokens=16",
        "logger.mode=disabled"]


def compose_run(*overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = compose_run(*TINY, "bench.modes=[parallel,sequential,batched,baseline,prefix]")
    run_benchmarks(to_run_config(cfg), out, cfg)
    return json.loads((out / "bench.json").read_text()), out


def test_writes_json_markdown_and_plot(report):
    data, out = report
    assert (out / "bench.md").read_text().startswith("# paradec bench")
    assert (out / "bench.png").stat().st_size > 1000
    for key in ("environment", "workload", "decode", "decode_limit", "speedup", "bare_forwards",
                "training", "train_overhead", "masks", "collator_tokens_per_s", "targets"):
        assert key in data, key
    assert data["environment"]["threads"] == 1  # pinned (bench.threads default) and reported
    modes = ["parallel", "sequential", "batched", "baseline", "prefix"]
    assert [(r["branches"], r["mode"]) for r in data["decode"]] == [
        (k, m) for k in (1, 2) for m in modes]
    for r in data["decode"]:
        for key in ("branches", "mode", "wall_s", "questions_per_s", "forward_calls",
                    "peak_kv_tokens"):
            assert key in r, key
        assert r["wall_s"] > 0 and r["questions_per_s"] > 0
        assert r["questions"] == 2 * r["branches"]
        assert r["new_tokens"] == T * r["questions"]  # EOS ignored: every mode does the same work
    assert set(data["decode_limit"]) == {"1", "2"}
    assert all(v > 0 for v in data["decode_limit"].values())
    assert data["train_overhead"] > 0 and data["collator_tokens_per_s"] > 0


def test_forward_calls_and_kv_tokens_are_exact(report):
    data, _ = report
    rows = {(r["branches"], r["mode"]): r for r in data["decode"]}
    for K in (1, 2):
        # one forward per column for all branches: 1 + (T - 1), whatever K
        assert rows[K, "parallel"]["forward_calls"] == 1 + (T - 1)
        assert rows[K, "sequential"]["forward_calls"] == K * T  # per context: K decodes
        assert rows[K, "batched"]["forward_calls"] == T
        # the context is cached once in parallel, once per question in batched
        assert rows[K, "parallel"]["peak_kv_tokens"] == N + K * Q + (T - 1) * K
        assert rows[K, "sequential"]["peak_kv_tokens"] == N + Q + (T - 1)
        assert rows[K, "batched"]["peak_kv_tokens"] == K * (N + Q + T - 1)
    # prefix: the context prefilled once and shared, the questions as one batch, then T-1 steps
    assert rows[2, "prefix"]["forward_calls"] == 1 + 1 + (T - 1)
    assert rows[2, "prefix"]["peak_kv_tokens"] == 2 * (N + Q + T - 1)
    assert data["speedup"]["2"]["kv_vs_batched"] == pytest.approx(
        (N + 2 * Q + 2 * (T - 1)) / (2 * (N + Q + T - 1)))
    assert data["targets"]["parallel_forward_calls"]["met"] is True


def test_mask_memory_rows(report):
    data, _ = report
    assert [m["length"] for m in data["masks"]] == [64, 256]
    try:  # whether this torch can build a BlockMask at all (it can on CPU since torch 2.5)
        flex_block_mask(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
        flex_here = True
    except Exception:  # noqa: BLE001
        flex_here = False
    for m in data["masks"]:
        assert m["dense_bool_bytes"] == m["length"] ** 2
        if flex_here:
            assert m["flex_error"] is None and 0 < m["flex_bytes"] < m["dense_bool_bytes"]
        else:
            assert m["flex_bytes"] is None and m["flex_error"]


def test_bad_bench_values_name_the_key():
    with pytest.raises(ValueError, match="bench.modes"):
        BenchConfig(modes=["warp"]).validate()
    with pytest.raises(ValueError, match="bench.branches"):
        BenchConfig(branches=[0]).validate()
    with pytest.raises(ValueError, match="bench.repeats"):
        BenchConfig(repeats=0).validate()


def test_cli_stage_bench(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "run.py", *TINY, "bench.branches=[2]", "bench.train=false",
         "bench.flex=false", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "training" not in data and data["decode_limit"]
    assert "| 2 | parallel |" in (tmp_path / "bench.md").read_text()
