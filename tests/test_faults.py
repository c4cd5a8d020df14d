"""Fault injection: run directories, damaged checkpoints, signals, bad inputs and bad settings.

Each test sets up one fault a user can run into and checks that paradec refuses it in one line
naming what is wrong (or recovers), before any training time is spent. A test that stops a
process waits on what it observes (a logged step), never on a sleep.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paradec import checkpoint as ckpt
from paradec import models, rundir
from paradec.config import EvalConfig, GenerateConfig, TrainerConfig, to_run_config
from paradec.evaluation import check_memory
from paradec.layout import Branch, BranchSample
from paradec.training import (
    apply_optimizer_settings,
    check_resume_settings,
    lr_lambda,
    make_optimizer,
)
from tests.test_cli import ENV, ROOT, TINY, cli, compose_run, read_metrics
from tests.tiny import tiny_model

# --- run directories ------------------------------------------------------------------------

def test_a_second_live_run_in_the_same_dir_refuses_naming_the_holder(tmp_path):
    first = rundir.lock(tmp_path)
    try:
        with pytest.raises(rundir.RunDirError, match=f"in use by another run.*{os.getpid()}"):
            rundir.lock(tmp_path)
    finally:
        first.release()
    rundir.lock(tmp_path).release()  # free again once the holder is gone


def test_a_fresh_run_refuses_an_earlier_runs_artefacts_unless_told_to_overwrite(tmp_path):
    (tmp_path / "checkpoints" / "step_0000009").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
    owner = rundir.lock(tmp_path)
    try:
        with pytest.raises(rundir.RunDirError, match="checkpoints, metrics.jsonl.*overwrite"):
            owner.start(resuming=False, overwrite=False)
        run_id = owner.start(resuming=False, overwrite=True)
    finally:
        owner.release()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_0000009").is_dir()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert rundir.read_run_id(tmp_path) == run_id


def test_a_fresh_run_into_an_old_run_dir_fails_at_start_up(tmp_path):
    args = ["stage=pretrain", *TINY, "trainer.max_steps=1", "trainer.eval_every=0"]
    cli(*args, run_dir=tmp_path)
    out = cli(*args, run_dir=tmp_path, check=False)
    assert out.returncode == 2 and "trainer.overwrite=true" in out.stderr
    assert sorted(read_metrics(tmp_path)) == [1]  # nothing appended


def _checkpoint(root: Path, step: int, run_id: str) -> Path:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ckpt.save_checkpoint(root, step, model=model, tokenizer=None, optimizer=opt,
                                scheduler=sched, trainer_state={"data": {}, "run_id": run_id},
                                keep_last=5)


def test_resume_auto_takes_only_the_checkpoints_of_the_run_that_owns_the_dir(tmp_path):
    _checkpoint(tmp_path, 2, "mine")
    _checkpoint(tmp_path, 7, "someone-else")
    assert ckpt.latest_checkpoint(tmp_path, "mine").name == "step_0000002"
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000007"


def test_a_damaged_checkpoint_is_named_and_skipped_for_the_newest_intact_one(tmp_path, caplog):
    _checkpoint(tmp_path, 1, "r")
    newest = _checkpoint(tmp_path, 2, "r")
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert ckpt.latest_checkpoint(tmp_path, "r").name == "step_0000001"
    assert "step_0000002" in caplog.text and "model/model.safetensors" in caplog.text
    (tmp_path / "step_0000001" / "optimizer.pt").unlink()  # missing
    assert ckpt.latest_checkpoint(tmp_path, "r") is None
    opt = torch.optim.AdamW(tiny_model().parameters())
    with pytest.raises(FileNotFoundError, match="step_0000002.*damaged"):
        ckpt.load_training_state(newest, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1))


def _logged_steps(run_dir: Path) -> int:
    """Training steps fully written to metrics.jsonl so far (a line being written is skipped)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []
    return sum('"train/loss"' in line for line in lines)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_at_the_next_step_and_exits_in_one_line(signum, code, tmp_path):
    args = ["stage=pretrain", *TINY, "trainer.max_steps=100000", "trainer.eval_every=0",
            "trainer.threads=1"]
    run_dir, err_file = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={run_dir}"],
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 240
        while _logged_steps(run_dir) < 2:  # observed: the run is in its loop
            assert proc.poll() is None and time.time() < deadline, "the run never reached step 2"
            time.sleep(0.05)
        proc.send_signal(signum)
        proc.wait(timeout=240)
    stderr = err_file.read_text()
    assert proc.returncode == code, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(signum).name} at step")
    saved = ckpt.latest_checkpoint(run_dir / "checkpoints")
    step = int(last.split("at step ")[1].split(";")[0])
    assert saved is not None and saved.name == f"step_{step:07d}"
    assert ckpt.checkpoint_problem(saved) is None
    assert max(read_metrics(run_dir)) == step


def test_unwritable_places_are_found_at_start_up(tmp_path):
    with pytest.raises(rundir.RunDirError, match="cannot create it"):
        rundir.check_writable(Path("/proc/paradec-cannot-be-here"))
    (tmp_path / "model").write_text("a file where the model directory goes")
    with pytest.raises(rundir.RunDirError, match="model: it exists and is not a directory"):
        rundir.check_writable(tmp_path)


# --- resuming with other settings -------------------------------------------------------------

def test_resuming_with_other_settings_lists_them_and_refuses_unless_allowed():
    saved = {"trainer": {"lr": 3e-3, "max_steps": 300, "progress": True, "resume": "none"},
             "model": {"hidden_size": 64}, "logger": {"mode": "offline"}}
    now = {"trainer": {"lr": 1e-3, "max_steps": 600, "progress": False, "resume": "auto"},
           "model": {"hidden_size": 64}, "logger": {"mode": "disabled"}}
    with pytest.raises(ValueError, match=r"trainer.lr 0.003 -> 0.001, trainer.max_steps 300 -> "
                                         r"600.*allow_changes=\[trainer.lr,trainer.max_steps\]"):
        check_resume_settings(saved, now, [], Path("ckpt"))
    assert check_resume_settings(saved, now, ["trainer.lr", "trainer.max_steps"],
                                 Path("ckpt")) == ["trainer.lr", "trainer.max_steps"]
    with pytest.raises(ValueError, match="cannot change: model.hidden_size"):
        check_resume_settings(saved, {**now, "model": {"hidden_size": 32}}, ["model"],
                              Path("ckpt"))


def test_an_allowed_learning_rate_change_really_applies_after_a_restore():
    model = tiny_model()
    old, new = TrainerConfig(lr=3e-3, max_steps=10), TrainerConfig(lr=1e-3, max_steps=10,
                                                                   beta2=0.9)
    opt = make_optimizer(model, old)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, 2, 10, 0.1))
    for _ in range(4):
        opt.step()
        sched.step()
    restored = make_optimizer(model, new)
    restored_sched = torch.optim.lr_scheduler.LambdaLR(restored, lambda s: lr_lambda(s, 2, 10, 0.1))
    restored.load_state_dict(opt.state_dict())
    restored_sched.load_state_dict(sched.state_dict())
    assert restored.param_groups[0]["lr"] == pytest.approx(3e-3 * lr_lambda(4, 2, 10, 0.1))
    apply_optimizer_settings(restored, restored_sched, new)
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(4, 2, 10, 0.1))
    assert restored.param_groups[0]["betas"] == (0.9, 0.9)
    restored.step()
    restored_sched.step()
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(5, 2, 10, 0.1))


def test_resuming_with_a_changed_learning_rate_is_refused_end_to_end(tmp_path):
    args = ["stage=pretrain", *TINY, "trainer.max_steps=2", "trainer.save_every=1",
            "trainer.eval_every=0"]
    cli(*args, run_dir=tmp_path)
    out = cli(*args, "trainer.resume=auto", "trainer.lr=1e-4", run_dir=tmp_path, check=False)
    assert out.returncode == 2 and "trainer.lr 0.003 -> 0.0001" in out.stderr


# --- inputs --------------------------------------------------------------------------------

def _saved_model(path: Path, tokenizer=None) -> Path:
    model = tiny_model(vocab=61)
    models.save_model(model, tokenizer, path)
    return path


def test_a_model_dir_without_tokenizer_files_is_an_error_naming_them(tmp_path):
    path = _saved_model(tmp_path / "m")
    with pytest.raises(ValueError, match="no tokenizer beside the model.*tokenizer.json"):
        models.load_model({"name": "x", "arch": "qwen3", "path": str(path)})


def test_a_tokenizer_larger_than_the_embeddings_is_an_error(tmp_path, tokenizer):
    path = _saved_model(tmp_path / "m", tokenizer)  # 400 tokens, 61 embeddings
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's embeddings only 61"):
        models.load_model({"name": "x", "arch": "qwen3", "path": str(path)})


def test_a_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path=.*nowhere: no such directory"):
        models.load_model({"name": "x", "arch": "qwen3", "path": str(tmp_path / "nowhere")})


def test_a_truncated_safetensors_file_is_named(tmp_path, tokenizer):
    path = _saved_model(tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(FileNotFoundError, match="model.safetensors is damaged.*truncated"):
        models.load_model({"name": "x", "arch": "qwen3", "path": str(path)})


def test_a_huge_evaluation_context_is_refused_before_anything_is_allocated():
    config = tiny_model().config
    long = BranchSample(list(range(200_000)), [Branch([1, 2], [3])], {"context_id": "huge"})
    short = BranchSample([1, 2, 3], [Branch([1], [3])], {"context_id": "short"})
    with pytest.raises(ValueError, match="mode parallel would need about .* GiB for context "
                                         "huge.*eval_overflow=truncate"):
        check_memory([short, long], EvalConfig(modes=["parallel"]), config)
    check_memory([short], EvalConfig(modes=["parallel", "baseline", "joint"]), config)


# --- settings --------------------------------------------------------------------------------

def test_an_added_unknown_key_is_refused_naming_it():
    with pytest.raises(ValueError, match="trainer.some_typo: not a config key"):
        to_run_config(compose_run("+trainer.some_typo=1"))


@pytest.mark.parametrize("questions", [[""], ["  "], [1], ["ok", None]])
def test_empty_or_non_text_questions_are_refused(questions):
    with pytest.raises(ValueError, match=r"generate.questions\[\d\]"):
        GenerateConfig(questions=questions).validate()


def test_head_counts_that_do_not_divide_are_one_line():
    with pytest.raises(ValueError, match="model.num_heads=5 must be a multiple of "
                                         "model.num_kv_heads=2"):
        to_run_config(compose_run("model.num_heads=5"))


def test_a_command_line_key_reaches_every_pipeline_stage(tmp_path):
    cli("stage=pipeline", *TINY, "trainer.max_steps=2", "trainer.eval_every=0",
        "pipeline.eval.eval.max_samples=1", "eval.max_new_tokens=2", "eval.modes=[parallel]",
        run_dir=tmp_path)
    for stage in ("pretrain", "finetune"):  # the pipeline file says 300 and 3000
        assert max(read_metrics(tmp_path / stage)) == 2, stage
    assert set(json.loads((tmp_path / "eval.json").read_text())) == {"parallel"}
