"""Sweeps: the Hydra sweep configs, the SLURM launcher config and the wandb sweep specs compose
into valid runs, and a real branch sweep gives one run dir, eval.json and wandb run per job, all in
one wandb group named after the sweep."""

import itertools
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from paradec.config import register_configs, to_run_config
from tests.test_cli import ENV, ROOT, TINY

CONF = ROOT / "conf"
SWEEPS = ROOT / "sweeps"
EVAL_KEYS = ("em", "f1", "questions_per_s", "forward_calls", "peak_kv_tokens")


# --- reading wandb's offline run files (no account, no network) ------------------------------

def wandb_records(path: Path):
    """The protobuf records of an offline ``run-<id>.wandb`` file (a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf += data
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_runs(run_dir: Path) -> list[dict]:
    """Per offline wandb run under ``run_dir``: its id, group, name, job type, history keys."""
    runs = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        info = {"history": [], "keys": set()}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info.update(id=record.run.run_id, group=record.run.run_group,
                            name=record.run.display_name, job_type=record.run.job_type)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                info["history"].append(row)
                info["keys"] |= set(row)
        runs.append(info)
    return runs


# --- composing -------------------------------------------------------------------------------

def compose_cfg(overrides, hydra_cfg=False):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides),
                       return_hydra_config=hydra_cfg)


def grid(params: dict) -> list[list[str]]:
    """Every combination of a ``hydra.sweeper.params`` mapping, as override lists."""
    parser = OverridesParser.create()
    axes = []
    for key, spec in params.items():
        (override,) = parser.parse_overrides([f"{key}={spec}"])
        axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
    return [list(combo) for combo in itertools.product(*axes)]


def sweep_names():
    return sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def test_there_is_a_branch_sweep_and_an_ablation():
    assert {"branches", "ablation"} <= set(sweep_names())


@pytest.mark.parametrize("name", sweep_names())
def test_every_sweep_point_is_a_valid_run(name):
    cfg = compose_cfg([f"+sweep={name}"], hydra_cfg=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, name
    assert name in str(cfg.hydra.sweep.dir)  # the wandb group (sweep dir name) says which sweep
    stages = ["pretrain", "finetune", "eval"] if name == "branches" else ["pretrain"]
    for stage in stages:
        for point in grid(params):
            run = to_run_config(compose_cfg([f"stage={stage}", *point]))
            for item in point:
                key, _, value = item.partition("=")
                got = OmegaConf.select(OmegaConf.structured(run), key)
                assert str(got).replace(" ", "").lower() == value.replace(" ", "").lower(), item


def test_the_branch_sweep_covers_one_to_sixteen():
    cfg = compose_cfg(["+sweep=branches"], hydra_cfg=True)
    points = grid(OmegaConf.to_container(cfg.hydra.sweeper.params))
    assert [p[0] for p in points] == [f"collator.branches_per_sample={k}" for k in (1, 2, 4, 8, 16)]


def test_the_ablation_crosses_the_four_options():
    cfg = compose_cfg(["+sweep=ablation"], hydra_cfg=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert set(params) == {"collator.align_to", "collator.interleave_branches",
                           "collator.isolate_branches", "model.pair_indices"}
    assert len(grid(params)) == 16


def test_slurm_launcher_config_composes_and_builds():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the slurm extra is not installed: pip install -e '.[slurm]'")
    from hydra.utils import instantiate

    cfg = compose_cfg(["hydra/launcher=slurm", "+sweep=branches",
                       "hydra.launcher.partition=gpu"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.partition == "gpu"
    assert instantiate(launcher) is not None  # submits nothing until a sweep is launched


# --- wandb sweep specs -----------------------------------------------------------------------

def wandb_specs():
    return sorted(p for p in SWEEPS.glob("*.yaml") if "program" in yaml.safe_load(p.read_text()))


def spec_points(parameters: dict) -> list[dict]:
    """Parameter sets a wandb agent could hand out, covering every listed value and each range's
    ends at least once (one axis at a time, the others at their first value)."""
    axes = {}
    for key, spec in parameters.items():
        if "value" in spec:
            axes[key] = [spec["value"]]
        elif "values" in spec:
            axes[key] = list(spec["values"])
        else:
            axes[key] = [spec["min"], spec["max"]]
    first = {key: values[0] for key, values in axes.items()}
    points = [first] + [{**first, key: v} for key, values in axes.items() for v in values[1:]]
    return points


def test_there_are_wandb_sweep_specs():
    assert wandb_specs(), "sweeps/ has no wandb sweep spec"


@pytest.mark.parametrize("path", wandb_specs(), ids=lambda p: p.name)
def test_wandb_spec_hands_run_py_valid_hydra_overrides(path, monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "run.py" and (ROOT / spec["program"]).is_file()
    command = spec["command"]
    assert "${args_no_hyphens}" in command and "${program}" in command
    extra = command[command.index("${args_no_hyphens}") + 1:]
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw123")
    monkeypatch.setenv("WANDB_RUN_ID", "run456")
    points = spec_points(spec["parameters"])
    assert points
    for point in points:
        # Exactly what `wandb agent` puts on the command line for this parameter set.
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
        overrides = args["args_no_hyphens"] + extra
        cfg = compose_cfg(overrides, hydra_cfg=True)
        assert cfg.hydra.run.dir == "runs/wandb/sw123/run456"
        with open_dict(cfg):
            del cfg["hydra"]
        run = to_run_config(cfg)
        for key, value in point.items():
            if (CONF / key).is_dir():  # a config group (stage=eval): the chosen file's name
                key = f"{key}.name"
            got = OmegaConf.select(OmegaConf.structured(run), key)
            if isinstance(value, float):
                assert got == pytest.approx(value), key
            else:
                assert str(got) == str(value), key
    if spec["metric"]["name"].startswith("eval/"):
        mode, metric = spec["metric"]["name"].split("/")[1:]
        assert metric in EVAL_KEYS


# --- a real sweep, end to end ----------------------------------------------------------------

def cli(*args, cwd, timeout=400):
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def sweep_dir(base: Path) -> Path:
    (found,) = [p for p in base.iterdir() if p.is_dir()]
    return found


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name))


def test_branch_sweep_one_run_per_job_in_one_wandb_group(tmp_path):
    """pretrain and eval sweeps over branches_per_sample (+sweep=branches, narrowed to 1,2 on the
    command line), run from another directory; then the offline report of both."""
    from paradec.report import write_report

    tiny = [o for o in TINY if not o.startswith("logger")] + ["logger.mode=offline",
                                                               "trainer.threads=1"]
    cli("-m", "+sweep=branches", "stage=pretrain", *tiny, "trainer.max_steps=2",
        "trainer.eval_every=2", "collator.branches_per_sample=1,2", cwd=tmp_path)
    pre = sweep_dir(tmp_path / "multirun" / "pretrain")
    assert pre.name.startswith("branches_")
    pre_jobs = job_dirs(pre)
    assert len(pre_jobs) == 2
    model = pre_jobs[1] / "model"
    cli("-m", "+sweep=branches", "stage=eval", f"model.path={model}", *tiny,
        "eval.max_samples=2", "eval.max_new_tokens=3", "collator.branches_per_sample=1,2",
        cwd=tmp_path)
    ev = sweep_dir(tmp_path / "multirun" / "eval")
    ev_jobs = job_dirs(ev)
    assert len(ev_jobs) == 2

    for sweep, jobs, stage in ((pre, pre_jobs, "pretrain"), (ev, ev_jobs, "eval")):
        ids = set()
        for k, job in zip((1, 2), jobs):
            saved = OmegaConf.load(job / ".hydra" / "config.yaml")
            assert saved.collator.branches_per_sample == k
            (run,) = wandb_runs(job)  # exactly one wandb run per job
            ids.add(run["id"])
            assert run["group"] == sweep.name
            assert run["job_type"] == stage
            assert f"collator.branches_per_sample={k}" in run["name"]
            if stage == "pretrain":
                assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                        "val/loss", "val/ppl"} <= run["keys"]
                assert (job / "model" / "model.safetensors").is_file()
            else:
                report = json.loads((job / "eval.json").read_text())
                for mode in report:
                    assert {f"eval/{mode}/{key}" for key in EVAL_KEYS} <= run["keys"]
                assert any(k.startswith("eval/predictions") for k in run["keys"])  # the table
        assert len(ids) == 2

    result = write_report(ev)
    assert {p.name for p in result["images"]} == {"eval_em.png", "eval_speedup.png",
                                                  "eval_questions_per_s.png"}
    text = (ev / "report.md").read_text()
    assert text.count("| parallel |") == 2 and "| sequential |" in text
    result = write_report(pre)
    assert [p.name for p in result["images"]] == ["train_loss.png"]


@pytest.mark.slow
def test_submitit_launcher_runs_a_sweep_locally(tmp_path):
    """The submitit plugin (the SLURM launcher's engine) runs our jobs: its local executor."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    tiny = [o for o in TINY if not o.startswith("logger")] + ["logger.mode=offline"]
    cli("-m", "hydra/launcher=submitit_local", "stage=pretrain", *tiny, "trainer.max_steps=1",
        "trainer.eval_every=0", "collator.branches_per_sample=1,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.timeout_min=10", cwd=tmp_path)
    jobs = job_dirs(tmp_path / "sweep")
    assert len(jobs) == 2
    groups = {wandb_runs(job)[0]["group"] for job in jobs}
    assert groups == {"sweep"}
    assert all((job / "model" / "model.safetensors").is_file() for job in jobs)
