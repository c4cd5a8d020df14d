"""What only a CUDA machine can run: FlexAttention against the sdpa bool mask (training forward
and backward, column-step decoding), bf16 training with padded rows, FSDP through accelerate
(train, save, resume), evaluation sharded over every GPU, and the benchmark on the GPU.

Every test here is marked ``cuda`` and skips without a CUDA device (tests/conftest.py);
``make gpu-check`` (scripts/gpu_check.py) runs them and prints one summary table. Their CPU
counterparts run in the ordinary suite: the same checks on CPU where CPU can run them
(test_models.py, test_multiprocess.py).
"""

import json
import math
import sys

import pytest
import torch

from paradec.config import DecodeConfig
from paradec.decoding import decode_columnar
from paradec.layout import Branch, BranchSample, build_layout
from paradec.loss import columnar_loss
from paradec.models import forward_layout
from tests.test_cli import ROOT, TINY, cli, read_metrics
from tests.test_models import random_samples
from tests.test_multiprocess import (
    check_fsdp_resumes_exactly,
    fsdp_launch,
    gpu_env,
    predictions,
    run_checked,
    torchrun,
)
from tests.test_rope import small_model

pytestmark = pytest.mark.cuda
CUDA = "cuda"
# fp32 on both sides: the kernels differ (Triton vs cuDNN / efficient attention), not the math.
CLOSE = dict(atol=1e-3, rtol=1e-3)


def twin_models(**overrides):
    """The same random weights under sdpa (bool mask) and flex_attention (BlockMask), on CUDA."""
    sdpa = small_model(pair_indices=[2, 6], attn_implementation="sdpa", **overrides)
    flex = small_model(pair_indices=[2, 6], attn_implementation="flex_attention", **overrides)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa.to(CUDA), flex.to(CUDA)


def train_forward_backward(model, layout):
    """(logits, loss, gradients) of one training forward and backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = forward_layout(model, layout).logits
    loss, _ = columnar_loss(logits, layout.labels)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("isolate", [False, True])
def test_flex_block_mask_equals_sdpa_in_training(isolate):
    sdpa, flex = twin_models()
    layout = build_layout(random_samples(seed=4, n_samples=3), align_to="right", pad_to=48)
    layout.isolate_branches = isolate
    layout = layout.to(CUDA)
    valid = layout.valid
    assert (~valid).any()  # padded rows are part of the comparison
    want = train_forward_backward(sdpa, layout)
    got = train_forward_backward(flex, layout)
    assert torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0][valid], want[0][valid], **CLOSE)
    torch.testing.assert_close(got[1], want[1], **CLOSE)
    assert got[2].keys() == want[2].keys() and want[2]
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **CLOSE, msg=name)
    # The comparison can fail: the other mask rule changes the logits far beyond the tolerance.
    layout.isolate_branches = not isolate
    other = forward_layout(sdpa, layout).logits.detach()
    assert (other[valid] - want[0][valid]).abs().max() > 100 * CLOSE["atol"]


@pytest.mark.parametrize("isolate", [False, True])
def test_flex_block_mask_equals_sdpa_in_column_step_decoding(isolate):
    sdpa, flex = twin_models()
    # Every question needs a prompt token to decode from; prompts of 1-3 tokens.
    samples = [BranchSample(s.background, [Branch(b.prompt or b.target[:1], []) for b in s.branches])
               for s in random_samples(seed=5, n_samples=3)]
    cfg = DecodeConfig(max_new_tokens=6)
    runs = [decode_columnar(model.eval(), samples, eos_token_id=None, pad_token_id=0,
                            align_to="right", isolate_branches=isolate, cfg=cfg,
                            keep_logits=True) for model in (sdpa, flex)]
    want, got = runs
    assert got.tokens == want.tokens  # greedy: the same tokens
    assert got.forward_calls == want.forward_calls == cfg.max_new_tokens
    for (want_active, want_logits), (got_active, got_logits) in zip(want.steps, got.steps):
        assert torch.equal(got_active, want_active)
        torch.testing.assert_close(got_logits[got_active], want_logits[want_active], **CLOSE)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bf16_training_steps_with_padded_rows_stay_finite(attn, weights):
    """bf16 autocast (fp32 weights) and bf16 weights: logits, loss, gradients and the updated
    weights stay finite, padded rows included (a padding query attends to itself only)."""
    model = small_model(pair_indices=[2, 6], attn_implementation=attn, dtype=weights)
    model = model.to(CUDA).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    layout = build_layout(random_samples(seed=1, n_samples=3), pad_to=64).to(CUDA)
    assert (~layout.valid).any()
    for _ in range(3):
        with torch.autocast(CUDA, dtype=torch.bfloat16):
            logits = forward_layout(model, layout).logits
        loss, _ = columnar_loss(logits, layout.labels)
        loss.backward()
        assert torch.isfinite(logits).all() and torch.isfinite(loss)
        for name, param in model.named_parameters():
            assert param.grad is None or torch.isfinite(param.grad).all(), name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_pretraining_through_the_cli(tmp_path):
    cli("stage=pretrain", *TINY, "trainer.mixed_precision=bf16", "trainer.max_steps=20",
        "trainer.eval_every=10", run_dir=tmp_path, subprocess_run=True)
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == list(range(1, 21))
    for step, row in metrics.items():
        assert math.isfinite(row["train/loss"]) and math.isfinite(row["train/grad_norm"]), step
    assert math.isfinite(metrics[20]["val/loss"])
    assert metrics[20]["train/loss"] < metrics[1]["train/loss"]  # it learns


def test_fsdp_through_accelerate_saves_and_resumes_exactly(tmp_path):
    """FSDP2 (accelerate/fsdp.yaml) on every GPU here (one process with one GPU): sharded
    optimizer checkpoints, a damaged one skipped, resumed to the same losses. fp32, so the
    only difference between the runs is the order of floating-point sums (tolerance 1e-4)."""
    gpus = torch.cuda.device_count()
    run_dir = tmp_path / "fsdp"
    check_fsdp_resumes_exactly(
        run_dir, lambda *a: fsdp_launch(*a, processes=gpus, env=gpu_env()),
        extra=("trainer.mixed_precision=no",), tolerance=1e-4)
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert len(ranks) == gpus and all(r["params"] is None for r in ranks)  # sharded


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpu_pretrain")
    cli("stage=pretrain", *TINY, "trainer.max_steps=30", "trainer.eval_every=0",
        run_dir=run_dir, subprocess_run=True)
    return run_dir / "model"


def test_eval_sharded_over_every_gpu_answers_like_one(gpu_model, tmp_path):
    gpus = torch.cuda.device_count()
    args = ["stage=eval", f"model.path={gpu_model}", *TINY, "eval.max_samples=8",
            "eval.max_new_tokens=4", "collator.branches_per_sample=3"]
    one, many = tmp_path / "one", tmp_path / "many"
    run_checked([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={one}"], 600,
                gpu_env())
    torchrun(*args, f"hydra.run.dir={many}", processes=gpus, env=gpu_env())
    assert predictions(many) == predictions(one)
    report = json.loads((many / "eval.json").read_text())
    for row in report.values():
        assert row["processes"] == gpus and row["n_questions"] == 32
        assert sum(r["contexts"] for r in row["ranks"]) == 8


def test_bench_runs_on_the_gpu_with_absolute_times(tmp_path):
    cli("stage=bench", "bench=quick", "bench.train_repeats=1", "bench.collator_repeats=1",
        "bench.plot=false", "logger.mode=disabled", run_dir=tmp_path, subprocess_run=True)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["environment"]["device"].startswith("cuda")
    assert report["environment"]["ratio_clock"] == "wall"  # CPU time does not see the GPU
    assert {(r["branches"], r["mode"]) for r in report["decode"]} >= {(4, "parallel"),
                                                                       (4, "sequential")}
    for row in report["decode"]:
        assert row["wall_s"] > 0 and row["questions_per_s"] > 0
    assert all(t["columnar_step_s"] > 0 for t in report["training"])
