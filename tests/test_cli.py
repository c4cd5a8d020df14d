"""The real configs and the real CLI: every config file composes; tiny runs; kill and resume."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from paradec.config import register_configs, to_run_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
# Small everything: a 300-token BPE on 300 backgrounds, 2 samples per batch.
TINY = ["model.tokenizer.vocab_size=300", "data.train_size=300", "data.validation_size=20",
        "data.test_size=20", "trainer.batch_size=2", "trainer.eval_batches=1",
        "trainer.progress=false", "logger.mode=disabled"]


def compose_run(*overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=False)
    return cfg


def group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["stage", "model", "data", "collator", "trainer", "eval", "logger"])
def test_every_config_file_composes(group):
    options = group_options(group)
    assert options, group
    for option in options:
        run = to_run_config(compose_run(f"{group}={option}"))
        assert run.collator.branch_stride == run.model.branch_stride  # the collator follows the preset


def test_every_config_file_starts_with_the_command_that_uses_it():
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        first = lines[1] if lines[0].startswith("# @package") else lines[0]
        # the command, optionally after the environment it needs (PARADEC_DATA_DIR=...)
        assert re.match(r"# ([A-Z_]+=\S+ )*python run\.py", first), path


def cli(*args, run_dir=None, timeout=300, check=True, subprocess_run=False):
    """``python run.py *args [hydra.run.dir=run_dir]``: in this process through run.py's own
    Hydra entry point (argv and all), or as a real subprocess for multiruns, ``--cfg`` and
    ``subprocess_run=True``. Returns a ``CompletedProcess`` either way."""
    argv = [*args] + ([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])
    if subprocess_run or "-m" in argv or "--cfg" in argv:
        out = subprocess.run([sys.executable, "run.py", *argv], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=timeout)
    else:
        out = run_in_process(argv)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def run_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """run.py run as ``__main__`` with ``sys.argv`` set, stdout / stderr captured; the exit code of a
    ``SystemExit`` (0 when it returns). Torch's thread count and RNGs are restored after."""
    import contextlib
    import io
    import runpy

    import torch

    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    saved_argv, threads = sys.argv, torch.get_num_threads()
    GlobalHydra.instance().clear()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        sys.argv = ["run.py", *argv]
        try:  # as __main__, so Hydra finds conf/ next to run.py as it does from the shell
            runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        finally:
            sys.argv = saved_argv
            torch.set_num_threads(threads)
            GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


@pytest.mark.parametrize("override, key", [
    ("collator.branchs_per_sample=4", "branchs_per_sample"),
    ("collator.align_to=middle", "collator.align_to"),
    ("trainer.lr=fast", "lr"),
    ("logger.mode=loud", "logger.mode"),
    ("model.pair_indices=[99]", "model.pair_indices"),
    ("eval.modes=[warp]", "eval.modes"),
])
def test_bad_keys_and_values_fail_at_start_naming_the_key(override, key, tmp_path):
    out = cli(*TINY, "trainer.max_steps=1", override, run_dir=tmp_path, check=False)
    assert out.returncode != 0
    assert key in out.stderr + out.stdout
    # At start-up: before any data, model or step was written.
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_cfg_job_prints_the_composed_config():
    out = cli("--cfg", "job", "stage=finetune")
    assert "name: finetune" in out.stdout and "branches_per_sample" in out.stdout


def read_metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}  # the last record of a step wins


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny pretraining run shared by the tests that start from a pretrained model."""
    pre = tmp_path_factory.mktemp("pre")
    cli("stage=pretrain", *TINY, "trainer.max_steps=3", "trainer.eval_every=2",
        "model.pair_indices=[5,6]", run_dir=pre)
    return pre


def test_pretrain_finetune_eval_through_the_cli(pretrained, tmp_path):
    pre = pretrained
    assert (pre / "model" / "model.safetensors").is_file()
    assert (pre / "model" / "tokenizer.json").is_file()
    metrics = read_metrics(pre)
    assert sorted(metrics) == [1, 2, 3]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert key in metrics[3]
    assert "val/loss" in metrics[2] and "val/ppl" in metrics[3]
    fin = tmp_path / "fin"
    cli("stage=finetune", f"model.path={pre / 'model'}", *TINY, "trainer.max_steps=2",
        "trainer.eval_every=0", run_dir=fin, subprocess_run=True)
    assert (fin / "model" / "model.safetensors").is_file()
    # the pairs saved with the pretrained model win over the preset's default [8, 9, 10, 11]
    saved = json.loads((fin / "model" / "config.json").read_text())["columnar"]
    assert saved == {"pair_indices": [5, 6], "branch_stride": 128}
    ev = tmp_path / "ev"
    out = cli("stage=eval", f"model.path={fin / 'model'}", *TINY, "eval.max_samples=3",
              "eval.max_new_tokens=4", run_dir=ev, subprocess_run=True)
    report = json.loads((ev / "eval.json").read_text())
    assert list(report) == ["baseline", "sequential", "parallel"]
    assert "| em |" in out.stdout
    assert (ev / "predictions.jsonl").is_file()


def test_offline_logger_writes_one_wandb_run_per_job(tmp_path):
    cli("-m", "stage=pretrain", *[o for o in TINY if not o.startswith("logger")],
        "logger.mode=offline", "trainer.max_steps=1", "trainer.eval_every=0",
        "collator.branches_per_sample=1,2", f"hydra.sweep.dir={tmp_path}")
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert len(jobs) == 2
    ids = []
    for job in jobs:
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        ids.append(runs[0].name.rsplit("-", 1)[-1])
    assert len(set(ids)) == 2


def test_a_run_cut_after_a_checkpoint_resumes_exactly(tmp_path):
    """A run left as a SIGKILL at step 5 leaves it (checkpoint 3 complete, checkpoint 6 half
    written, metrics up to step 5, no model) continues with trainer.resume=auto to the same
    losses as a run left alone. The cut is made on disk, so nothing depends on timing."""
    args = ["stage=pretrain", *TINY, "trainer.max_steps=10", "trainer.save_every=3",
            "trainer.eval_every=5", "trainer.warmup_steps=2", "trainer.threads=1",
            "trainer.keep_checkpoints=5"]
    alone, cut = tmp_path / "alone", tmp_path / "cut"
    cli(*args, run_dir=alone)
    cli(*args, run_dir=cut)
    checkpoints = cut / "checkpoints"
    (checkpoints / "step_0000006").rename(checkpoints / ".tmp-step_0000006")  # mid-write
    shutil.rmtree(checkpoints / "step_0000009")
    shutil.rmtree(cut / "model")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= 5]
    (cut / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    cli(*args, "trainer.resume=auto", run_dir=cut)
    want, got = read_metrics(alone), read_metrics(cut)
    assert sorted(got) == list(range(1, 11))
    for step in range(4, 11):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"], abs=1e-5), step
    assert got[10]["val/loss"] == pytest.approx(want[10]["val/loss"], abs=1e-5)


def test_finetune_refuses_a_conflicting_rope_override(pretrained, tmp_path):
    out = cli("stage=finetune", f"model.path={pretrained / 'model'}", *TINY,
              "trainer.max_steps=1", "model.pair_indices=[1,2]", run_dir=tmp_path, check=False)
    assert out.returncode != 0 and "model.pair_indices" in out.stderr
    assert not (tmp_path / "model").exists()


def test_lora_finetune_saves_an_adapter_that_eval_and_generate_load(pretrained, tmp_path):
    fin = tmp_path / "lora"
    cli("stage=finetune", f"model.path={pretrained / 'model'}", *TINY, "trainer.max_steps=2",
        "trainer.eval_every=0", "model.lora.enabled=true", "model.lora.r=4",
        "model.lora.merge=true", run_dir=fin)
    assert (fin / "model" / "adapter_model.safetensors").is_file()
    assert not (fin / "model" / "model.safetensors").exists()  # only the adapter
    assert (fin / "model_merged" / "model.safetensors").is_file()
    ev = tmp_path / "ev"
    cli("stage=eval", f"model.path={fin / 'model'}", *TINY, "eval.max_samples=2",
        "eval.max_new_tokens=3", "eval.modes=[parallel,sequential]", run_dir=ev)
    assert set(json.loads((ev / "eval.json").read_text())) == {"parallel", "sequential"}
    out = cli("stage=generate", f"model.path={fin / 'model_merged'}", "generate.max_new_tokens=3",
              "generate.plot=false", run_dir=tmp_path / "gen")
    assert "bg (0)" in out.stdout and "br 3" in out.stdout and "forward calls" in out.stdout


def test_pipeline_runs_every_stage_and_puts_eval_on_top(tmp_path):
    cli("stage=pipeline", *TINY, "trainer.eval_every=0", "pipeline.pretrain.trainer.max_steps=2",
        "pipeline.finetune.trainer.max_steps=2", "pipeline.eval.eval.max_samples=2",
        "eval.max_new_tokens=3", run_dir=tmp_path)
    for stage in ("pretrain", "finetune"):
        assert (tmp_path / stage / "model" / "model.safetensors").is_file()
        assert (tmp_path / stage / "metrics.jsonl").is_file()
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report == json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(report) == {"baseline", "sequential", "parallel"}
    assert (tmp_path / "predictions.jsonl").is_file()


def test_a_pipeline_stage_can_use_another_data_task():
    """pipeline.pretrain.data.name=fineweb: pretrain composes data=fineweb, the rest stay."""
    from paradec.stages import stage_config

    line = ["stage=pipeline", "pipeline.pretrain.data.name=fineweb",
            "pipeline.pretrain.data.seq_length=64"]
    run = to_run_config(compose_run(*line))
    pre = to_run_config(stage_config("pretrain", run.pipeline.pretrain, overrides=line))
    assert type(pre.data).__name__ == "FinewebDataConfig" and pre.data.seq_length == 64
    assert pre.data.hub_id == "HuggingFaceFW/fineweb-edu"  # fineweb's own defaults
    assert pre.trainer.lr == 1e-2 and pre.stage.name == "pretrain"  # the pipeline's section
    fin = to_run_config(stage_config("finetune", run.pipeline.finetune, overrides=line))
    assert fin.data.name == "synthetic" and fin.collator.loss_on == "target"
    with pytest.raises(ValueError, match="pipeline.pretrain.data.name: unknown data task 'webtext'"):
        stage_config("pretrain", {"data.name": "webtext"}, overrides=[])


def test_a_stage_composes_as_on_its_own_and_the_command_line_reaches_it():
    """A pipeline stage's config equals `python run.py stage=<stage>` with the same command line,
    plus its section; a command-line key wins over a section unless set per stage."""
    from paradec.config import section_values
    from paradec.stages import stage_config

    line = ["stage=pipeline", "model=small", "trainer.max_steps=7",
            "pipeline.finetune.trainer.warmup_steps=3", "pipeline.pretrain.trainer.max_steps=5"]
    run = to_run_config(compose_run(*line))
    assert section_values(run.pipeline.finetune)["trainer.warmup_steps"] == 3  # no `+` needed
    fin = stage_config("finetune", run.pipeline.finetune, overrides=line)
    alone = compose_run("stage=finetune", "model=small", "trainer.max_steps=7")
    for section in ("model", "data", "eval", "logger"):  # sections the pipeline leaves alone
        assert fin[section] == alone[section], section
    assert fin.collator.min_branches_per_sample == 1 and alone.collator.min_branches_per_sample is None
    assert fin.trainer.max_steps == 7 and fin.trainer.warmup_steps == 3  # command line, section
    assert fin.trainer.lr == 3e-3  # the pipeline's finetune section, over stage=finetune's 1e-3
    pre = stage_config("pretrain", run.pipeline.pretrain, overrides=line)
    assert pre.trainer.max_steps == 5  # set as pipeline.pretrain.<key>: wins for its stage
    with pytest.raises(Exception, match="warmup_stepz"):
        compose_run("stage=pipeline", "pipeline.finetune.trainer.warmup_stepz=3")


def test_squad_local_experiment_reads_the_data_dir(monkeypatch):
    monkeypatch.setenv("PARADEC_DATA_DIR", "/data")
    cfg = compose_run("experiment=squad_local")
    run = to_run_config(cfg)
    assert run.stage.name == "pipeline" and run.model.name == "small"
    assert run.data.test_path == "/data/squad/squad-v1.1-dev-a.json.gz"
    pretrain = OmegaConf.to_container(cfg.pipeline.pretrain, resolve=True)
    assert pretrain["data"]["path"][0] == "/data/text/fineweb-edu-sample-150docs.jsonl.gz"


@pytest.mark.slow
def test_sixty_step_pretrain_of_tiny_clearly_lowers_the_loss(tmp_path):
    """Issue target: the last 5 steps' loss at least 10% below the first 5 (default data, tiny)."""
    cli("stage=pretrain", "model=tiny", "trainer.max_steps=60", "trainer.eval_every=0",
        "trainer.progress=false", "logger.mode=disabled", run_dir=tmp_path, timeout=900)
    losses = [m["train/loss"] for _, m in sorted(read_metrics(tmp_path).items())]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 60 and last <= 0.9 * first, (first, last)


DATA_DIR = os.environ.get("PARADEC_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="PARADEC_DATA_DIR is not set")


@needs_data
def test_pretrain_on_real_fineweb_text_and_finetune_on_real_squad(tmp_path):
    base = ["model.tokenizer.vocab_size=1000", "trainer.batch_size=2", "trainer.eval_batches=1",
            "trainer.progress=false", "logger.mode=disabled", "trainer.max_steps=2",
            "trainer.eval_every=2"]
    pre = tmp_path / "pre"
    cli("stage=pretrain", "data=fineweb",
        f"data.path={DATA_DIR}/text/fineweb-edu-sample-150docs.jsonl.gz", *base, run_dir=pre)
    assert (pre / "model" / "model.safetensors").is_file()
    fin = tmp_path / "fin"
    cli("stage=finetune", "data=squad", f"model.path={pre / 'model'}",
        f"data.path={DATA_DIR}/squad/squad-v1.1-train-subset.json.gz",
        f"data.eval_path={DATA_DIR}/squad/squad-v1.1-dev-a.json.gz", *base, run_dir=fin)
    ev = tmp_path / "ev"
    cli("stage=eval", "data=squad", f"model.path={fin / 'model'}",
        f"data.path={DATA_DIR}/squad/squad-v1.1-train-subset.json.gz",
        f"data.eval_path={DATA_DIR}/squad/squad-v1.1-dev-a.json.gz", "eval.split=validation",
        "eval.max_samples=2", "eval.max_new_tokens=3", "logger.mode=disabled", run_dir=ev)
    assert json.loads((ev / "eval.json").read_text())["parallel"]["n_questions"] >= 2
