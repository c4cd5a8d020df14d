"""stage=bench on a tiny model with tiny sizes: the report's structure and its exact counts.

Timings are never asserted (the machine is shared and noisy); forward calls, KV-cache sizes and
the machine-limit arithmetic are exact, so they are.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from paradec import models
from paradec.bench import roofline
from paradec.bench.memory import peak_rss, start_peak_rss
from paradec.bench.stage import bench_model, run_benchmarks
from paradec.config import BenchConfig, ModelConfig, register_configs, to_run_config
from paradec.masks import flex_block_mask
from paradec.prompts import JOINT_LINE_TOKENS
from paradec.stages import adopt_saved_columnar

ROOT = Path(__file__).resolve().parents[1]
N1, N2, Q, T = 20, 40, 4, 5  # context tokens, question tokens, new tokens
MODES = ["parallel", "prefix", "sequential", "batched", "joint", "baseline"]
TINY = ["stage=bench", "bench.models=[tiny]", f"bench.context_lengths=[{N1},{N2}]",
        "bench.branches=[1,2]", "bench.contexts=2", f"bench.question_tokens={Q}",
        f"bench.new_tokens={T}", "bench.repeats=1", "bench.warmup=0", "bench.train_repeats=1",
        "bench.train_lengths=[64]", "bench.mask_lengths=[64,256]", "bench.collator_repeats=1",
        "bench.collator_samples=2", "bench.collator_branches=2", "bench.collator_tokens=16",
        "logger.mode=disabled", "trainer.progress=false"]


def compose_run(*overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = compose_run(*TINY, f"bench.modes=[{','.join(MODES)}]")
    run_benchmarks(to_run_config(cfg), out, cfg)
    return json.loads((out / "bench.json").read_text()), out


def rows(data):
    return {(r["context_tokens"], r["branches"], r["mode"]): r for r in data["decode"]}


def test_writes_json_markdown_and_plot(report):
    data, out = report
    assert (out / "bench.md").read_text().startswith("# paradec bench: tiny")
    assert (out / "bench.png").stat().st_size > 1000
    for key in ("environment", "workload", "models", "decode", "bare_limit", "training",
                "masks", "collator_tokens_per_s", "targets"):
        assert key in data, key
    env = data["environment"]
    assert env["threads"] == 1  # pinned (bench.threads default) and reported
    assert env["machine"]["read_bytes_per_s"] > 0 and env["machine"]["matmul_flops_per_s"] > 0
    assert data["models"]["tiny"]["weights"] == "random"
    assert [(r["context_tokens"], r["branches"], r["mode"]) for r in data["decode"]] == [
        (n, k, m) for n in (N1, N2) for k in (1, 2) for m in MODES]
    for r in data["decode"]:
        assert r["wall_s"] > 0 and r["questions_per_s"] > 0
        assert r["prefill_s"] > 0 and r["steps_s"] > 0 and r["step_ms"] > 0
        assert 0 < r["limit_s"] and 0 < r["steps_limit_s"] < r["limit_s"]
        one_at_a_time = r["mode"] in ("sequential", "baseline")
        assert r["questions"] == 2 * (1 if one_at_a_time else r["branches"])
        per_answer = T + JOINT_LINE_TOKENS if r["mode"] == "joint" else T
        assert r["new_tokens"] == per_answer * r["questions"]  # EOS ignored: the same work
        assert (r["mode"] == "parallel") == ("parallel_speedup" not in r)
    assert data["targets"]["tiny/forward_calls"]["met"] is True
    assert data["targets"]["tiny/peak_kv"]["met"] is True


def test_forward_calls_and_kv_tokens_are_exact(report):
    data, _ = report
    r = rows(data)
    for N in (N1, N2):
        for K in (1, 2):
            # one forward per column for all branches: 1 + (T - 1), whatever K
            assert r[N, K, "parallel"]["forward_calls"] == T
            assert r[N, K, "sequential"]["forward_calls"] == T  # one question per context
            assert r[N, K, "batched"]["forward_calls"] == T
            assert r[N, K, "prefix"]["forward_calls"] == 1 + 1 + (T - 1)  # context, questions
            assert r[N, K, "joint"]["forward_calls"] == K * (T + JOINT_LINE_TOKENS)
            # the context is cached once in parallel, once per question in prefix and batched
            assert r[N, K, "parallel"]["peak_kv_tokens"] == N + K * Q + (T - 1) * K
            assert r[N, K, "sequential"]["peak_kv_tokens"] == N + Q + T - 1
            assert r[N, K, "batched"]["peak_kv_tokens"] == K * (N + Q + T - 1)
            assert r[N, K, "prefix"]["peak_kv_tokens"] == K * (N + Q + T - 1)
            assert r[N, K, "joint"]["peak_kv_tokens"] == (N + K * Q
                                                          + K * (T + JOINT_LINE_TOKENS) - 1)


def test_one_question_at_a_time_runs_once_per_context_length(report):
    """Its cost per question does not depend on K: the same timed runs pair with every K."""
    data, _ = report
    r = rows(data)
    for mode in ("sequential", "baseline"):
        assert r[N1, 1, mode]["wall_s"] == r[N1, 2, mode]["wall_s"]
        assert r[N1, 1, mode]["wall_s"] != r[N2, 1, mode]["wall_s"]


def test_bare_forward_limit_at_the_smallest_context(report):
    data, _ = report
    assert sorted(data["bare_limit"]) == [f"tiny/N{N1}_K1", f"tiny/N{N1}_K2"]
    for v in data["bare_limit"].values():
        assert v["limit"] > 0 and v["achieved"] > 0


def test_training_rows_and_peak_memory(report):
    data, _ = report
    [row] = data["training"]
    assert row["model"] == "tiny" and row["length"] == 64 and row["time_ratio"] > 0
    if start_peak_rss() is not None:  # Linux: the high-water mark can be reset
        assert row["columnar_peak_rss"] > 0 and row["memory_ratio"] > 0


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


def test_a_mode_over_the_token_cap_is_skipped_and_listed(tmp_path):
    cfg = compose_run(*TINY, "bench.context_lengths=[40]", "bench.branches=[1,4]",
                      "bench.modes=[parallel,batched]", "bench.max_cell_tokens=100",
                      "bench.train=false", "bench.mask_lengths=[]", "bench.roofline=false",
                      "bench.plot=false")
    data = run_benchmarks(to_run_config(cfg), tmp_path, cfg)
    r = rows(data)
    assert "skipped" not in r[40, 1, "batched"]  # 44 tokens
    assert "bench.max_cell_tokens=100" in r[40, 4, "batched"]["skipped"]  # 4 x 44 tokens
    assert "parallel_speedup" in r[40, 1, "batched"]
    assert "Skipped: tiny N=40 K=4 batched" in (tmp_path / "bench.md").read_text()


def test_the_limit_is_the_bytes_or_the_flops_of_each_forward():
    machine = roofline.Machine(read_bytes_per_s=100.0, copy_bytes_per_s=100.0,
                               matmul_flops_per_s=1000.0, threads=1)
    costs = roofline.ModelCosts(weight_bytes=1000, token_flops=10, logit_flops=4,
                                kv_bytes_per_token=2, pair_flops=1)
    # a step of 3 branches against 50 cached tokens: bytes (1000 + 2 x 50) / 100 = 11 s; flops
    # (10 x 3 + 4 x 3 + 60) / 1000 = 0.102 s
    assert costs.forward_s(machine, fed=3, logits=3, kv_read=50, pairs=60) == pytest.approx(11.0)
    assert roofline.causal_pairs(4) == 10
    assert roofline.causal_pairs(6, context=4) == 10 + 2 * 5
    N, K, q, T = 100, 4, 5, 6
    par = roofline.mode_limits(costs, machine, "parallel", N, K, q, T, K)
    pre = roofline.mode_limits(costs, machine, "prefix", N, K, q, T, K)
    seq = roofline.mode_limits(costs, machine, "sequential", N, K, q, T, K)
    # parallel's steps read the context once, prefix's K times, sequential's once per question
    assert par[1] == pytest.approx(sum((1000 + 2 * (N + K * (q + t))) / 100 for t in range(1, T)))
    assert pre[1] == pytest.approx(sum((1000 + 2 * K * (N + q + t)) / 100 for t in range(1, T)))
    assert par[1] < pre[1] < seq[1]
    assert seq == pytest.approx(tuple(K * x for x in roofline.mode_limits(
        costs, machine, "sequential", N, K, q, T, 1)))
    with pytest.raises(ValueError, match="warp"):
        roofline.mode_limits(costs, machine, "warp", N, K, q, T, K)


def test_model_costs_count_each_weight_once():
    from tests.tiny import tiny_model

    model = tiny_model()  # tied embeddings: one matrix is both the lookup and the output head
    costs = roofline.ModelCosts.of(model)
    assert costs.weight_bytes == 4 * models.count_parameters(model)
    embed = model.get_input_embeddings().weight.numel()
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2) - embed
    assert costs.token_flops == 2 * matrices and costs.logit_flops == 2 * embed
    assert costs.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # k and v, layers, kv heads, head dim


def test_peak_resident_memory_sees_a_large_allocation():
    if start_peak_rss() is None:
        pytest.skip("the peak resident memory cannot be reset on this system")
    before = start_peak_rss()
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    del block
    assert peak_rss() - before >= 60 * 2 ** 20


def test_a_hub_preset_that_cannot_load_is_timed_with_random_weights_of_its_shape(monkeypatch):
    shape = dict(vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, tie_word_embeddings=True, rope_theta=1e4,
                 max_position_embeddings=512, initializer_range=0.02)
    preset = ModelConfig(name="hubby", arch="hub", hub_id="nobody/no-such-model",
                         offline_gguf="no_such_package_xyz/model.gguf", random_arch="llama",
                         **shape)
    monkeypatch.setattr(models, "load_preset", lambda name: dataclasses.replace(preset))
    run = to_run_config(compose_run(*TINY))
    model, tokenizer, name, weights = bench_model(run, "hubby")
    assert weights.startswith("random") and tokenizer is None and name == "hubby"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    monkeypatch.setattr(models, "load_preset",
                        lambda name: dataclasses.replace(preset, random_arch=None))
    with pytest.raises(ValueError, match="nobody/no-such-model"):
        bench_model(run, "hubby")


def test_bad_bench_values_name_the_key():
    for key, value in (("modes", ["warp"]), ("branches", [0]), ("repeats", 0),
                       ("context_lengths", [0]), ("single_questions", 0),
                       ("train_lengths", [-1]), ("max_cell_tokens", 0)):
        with pytest.raises(ValueError, match=f"bench.{key}"):
            BenchConfig(**{key: value}).validate()
    with pytest.raises(ValueError, match="bench.context_lengths"):
        BenchConfig(context_lengths=[]).validate()  # and no data contexts either
    with pytest.raises(ValueError, match="model.random_arch"):
        ModelConfig(name="x", arch="hub", hub_id="a/b", random_arch="hub").validate()


def test_the_presets_compose(monkeypatch):
    quick = to_run_config(compose_run("stage=bench", "bench=quick")).bench
    default = to_run_config(compose_run("stage=bench")).bench
    assert quick.models == default.models == ["minimind2_small"]
    smollm2 = to_run_config(compose_run("stage=bench", "bench=smollm2")).bench
    assert smollm2.models == ["smollm2_135m"] and not smollm2.train
    assert max(quick.context_lengths) < max(default.context_lengths)
    monkeypatch.setenv("PARADEC_DATA_DIR", "/data")
    squad = to_run_config(compose_run("experiment=bench_squad_smollm2"))
    assert squad.stage.name == "bench" and squad.data.name == "squad"
    assert squad.bench.models == ["smollm2_135m"] and squad.bench.data_contexts > 0
    assert squad.bench.context_lengths == [] and squad.data.test_path.startswith("/data/")


def test_cli_stage_bench(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "run.py", *TINY, "bench.branches=[2]", "bench.train=false",
         "bench.flex=false", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert not data["training"] and data["bare_limit"]
    assert f"| {N1} | 2 | parallel |" in (tmp_path / "bench.md").read_text()


def test_every_mode_on_a_data_tasks_own_contexts(tmp_path, tokenizer):
    """bench.data_contexts: the composed data task's contexts and questions, their real token
    lengths, on a model with a tokenizer (here model.path, through bench.models=[])."""
    from tests.test_tasks_squad import official
    from tests.tiny import tiny_model

    model = tiny_model(vocab=len(tokenizer), pair_indices=[7])
    models.save_model(model, tokenizer, tmp_path / "model")
    (tmp_path / "dev.json").write_text(json.dumps(official()))
    cfg = compose_run(*TINY, "bench.models=[]", f"model.path={tmp_path / 'model'}",
                      "data=squad", f"data.eval_path={tmp_path / 'dev.json'}", "eval.split=validation",
                      "bench.context_lengths=[]", "bench.data_contexts=2", "bench.train=false",
                      "bench.mask_lengths=[]", "bench.plot=false",
                      "bench.modes=[parallel,prefix,sequential]", "collator.branches_per_sample=8")
    run = to_run_config(cfg)
    adopt_saved_columnar(run)  # as stage=bench does: the checkpoint's own 2D RoPE settings
    data = run_benchmarks(run, tmp_path / "out", cfg)
    assert data["decode"] == []
    by_mode = {r["mode"]: r for r in data["data"]}
    assert set(by_mode) == {"parallel", "prefix", "sequential"}
    assert by_mode["parallel"]["contexts"] == 2
    assert by_mode["parallel"]["questions"] == 6  # the Normans' 5 and the Rhine's 1
    assert by_mode["sequential"]["questions"] == 2  # bench.single_questions=1 per context
    assert by_mode["parallel"]["forward_calls"] == T  # per context
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "Real lengths (2 samples" in md
    # no grid: neither its empty tables nor its unmeasured targets are printed
    assert "no N x K grid" in md and "| N | K |" not in md and "None measured" in md
    assert all(t["value"] is None for t in data["targets"].values())


def test_the_probes_report_what_they_name(capsys):
    from paradec.bench import probes
    from paradec.bench.__main__ import main

    layer = probes.attention_layer(length=600, heads=4, kv_heads=2, head_dim=16, repeats=1)
    assert layer["length"] == 600
    assert all(layer[k] > 0 for k in ("transformers_sdpa_dense_mask_s", "columnar_sdpa_s",
                                      "is_causal_s"))
    shares = probes.parallel_step_profile("tiny", context=64, branches=2, steps=2)
    assert abs(sum(share for _, share in shares) - 1) < 1e-6
    assert any("mm" in name or "linear" in name for name, _ in shares[:5])
    main(["layout", "--samples", "2", "--branches", "2", "--tokens", "16"])
    assert "M tokens/s" in capsys.readouterr().out
