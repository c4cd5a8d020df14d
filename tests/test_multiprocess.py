"""Two processes (accelerate launch, gloo on CPU) run the one training loop: each rank reads
different batches, parameters stay identical, and the run has one metrics.jsonl, one wandb run,
one checkpoints dir and one model/, in the main process's run dir.

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` starts two CPU
processes with torchrun; ``accelerate launch --cpu --num_processes 2`` does NOT (without
``--mpirun_hostfile`` it starts a single process), see docs/scaling.md.

Evaluation runs on every process (each answers whole contexts) and must give the files a single
process gives: the same predictions, token for token, each question once.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from paradec.batches import BatchStream
from tests.test_cli import ENV, ROOT, TINY, read_metrics
from tests.test_sweeps import wandb_runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# CPU processes: GPUs hidden (gloo), one thread each.
PROCESS_ENV = {**ENV, "PARADEC_RANK_REPORT": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def gpu_env() -> dict:
    """The environment of :data:`PROCESS_ENV` with this machine's GPUs visible."""
    env = {k: v for k, v in PROCESS_ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return env


def run_checked(cmd, timeout, env=None):
    out = subprocess.run(cmd, cwd=ROOT, env=env or PROCESS_ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def launch(*args, timeout=400):
    """``accelerate launch --multi_gpu --num_processes 2 run.py *args`` (two CPU processes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "run.py", *args]
    return run_checked(cmd, timeout)


def torchrun(*args, processes=2, env=None, timeout=400):
    """``torchrun --nproc_per_node <processes> run.py *args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(free_port()), "run.py", *args]
    return run_checked(cmd, timeout, env)


def single(*args, env=None, timeout=400):
    """``python run.py *args``: one process, the same environment as the launched ones."""
    return run_checked([sys.executable, "run.py", *args], timeout, env)


def test_batch_streams_of_two_ranks_are_disjoint():
    items = list(range(40))
    seen = []
    for rank in (0, 1):
        stream = BatchStream(items, 4, seed=3, rank=rank, world_size=2)
        seen.append({i for _ in range(5) for i in next(stream)})  # one epoch: 20 items per rank
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(items)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A 3-step pretraining in two processes; each process gets its own Hydra run dir on purpose
    (rank0/, rank1/): the run must still land in the main process's one (shared_run_dir)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    tiny = [o for o in TINY if not o.startswith("logger")] + ["logger.mode=offline"]
    launch("stage=pretrain", *tiny, "trainer.max_steps=3", "trainer.eval_every=2",
           "trainer.save_every=2", "trainer.threads=1",
           f"hydra.run.dir={tmp_path}/rank${{oc.env:RANK,0}}")
    return tmp_path


def test_two_processes_train_one_run(two_process_run):
    from paradec.models import load_pretrained
    from paradec.training import parameter_checksum

    tmp_path = two_process_run
    run, other = tmp_path / "rank0", tmp_path / "rank1"

    ranks = json.loads((run / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["step"] for r in ranks} == {3}
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # different batches
    assert ranks[0]["params"] == ranks[1]["params"]  # parameters in sync, bit for bit
    assert ranks[0]["tokenizer"] == ranks[1]["tokenizer"]  # same vocabulary on every rank

    # The saved model is those parameters.
    model, _ = load_pretrained(run / "model")
    assert parameter_checksum(model) == ranks[0]["params"]

    # One metrics.jsonl, one record per step; one wandb run with those steps.
    metrics = read_metrics(run)
    assert sorted(metrics) == [1, 2, 3]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "train/loss" in r]) == 3
    assert "val/loss" in metrics[2] and "val/loss" in metrics[3]
    (wb,) = wandb_runs(run)
    assert sorted(h["_step"] for h in wb["history"] if "train/loss" in h) == [1, 2, 3]

    # One checkpoints dir, one model/; the other process's Hydra dir holds only its own log.
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert (run / "model" / "model.safetensors").is_file()
    assert {p.name for p in other.iterdir()} <= {".hydra", "run.log"}
    assert not list(tmp_path.rglob("wandb/offline-run-*"))[1:]


def predictions(run_dir):
    """``{(id, mode): record}`` of predictions.jsonl; fails on a question answered twice."""
    out = {}
    for line in (run_dir / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        key = (record["id"], record["mode"])
        assert key not in out, f"{key} answered twice"
        out[key] = record
    return out


ALL_MODES = "eval.modes=[parallel,sequential,baseline,batched,prefix,joint]"


def test_two_processes_evaluate_like_one(two_process_run, tmp_path):
    """A branch-count sweep of evaluations (Hydra multirun) on two processes (torchrun) and on
    one: each job has one eval.json, one predictions.jsonl and one wandb run, and the same
    answers, token for token. 3 questions per sample, so a context of 4 spans two samples."""
    tiny = [o for o in TINY if not o.startswith("logger")] + ["logger.mode=offline"]
    model = two_process_run / "rank0" / "model"
    args = ["-m", "stage=eval", f"model.path={model}", *tiny, ALL_MODES, "eval.max_samples=5",
            "eval.max_new_tokens=4", "eval.batch_size=2", "collator.branches_per_sample=1,3"]
    one, two = tmp_path / "one", tmp_path / "two"
    single(*args, f"hydra.sweep.dir={one}")
    torchrun(*args, f"hydra.sweep.dir={two}")
    for job in ("0", "1"):
        want, got = predictions(one / job), predictions(two / job)
        assert got == want  # every question once per mode, the same answer and scores
        assert {mode for _, mode in got} == {"parallel", "sequential", "baseline", "batched",
                                            "prefix", "joint"}
        single_report = json.loads((one / job / "eval.json").read_text())
        report = json.loads((two / job / "eval.json").read_text())
        assert list(report) == list(single_report)
        for mode, row in report.items():
            for key in ("em", "f1", "n_questions", "new_tokens"):
                assert row[key] == single_report[mode][key], (job, mode, key)
            assert row["processes"] == 2 and single_report[mode]["processes"] == 1
            ranks = row["ranks"]
            assert [r["rank"] for r in ranks] == [0, 1]
            assert all(r["n_questions"] > 0 for r in ranks)  # both processes answered
            assert sum(r["n_questions"] for r in ranks) == row["n_questions"] == 20
            assert sum(r["contexts"] for r in ranks) == 5  # no context split over processes
            assert row["wall_s"] == max(r["wall_s"] for r in ranks)
            assert row["questions_per_s"] == pytest.approx(row["n_questions"] / row["wall_s"])
        assert len(wandb_runs(two / job)) == 1
    # The sample index of a question is the same as in one process; K=3 gives 2 samples per context.
    assert max(r["sample"] for r in predictions(two / "1").values()) == 9


def test_a_pipeline_on_two_processes_evaluates_on_both(tmp_path):
    """stage=pipeline under accelerate launch: training and evaluation on both processes, one
    eval.json and predictions.jsonl on top, each question once per mode."""
    launch("stage=pipeline", *TINY, "trainer.eval_every=0", "trainer.threads=1",
           "pipeline.pretrain.trainer.max_steps=2", "pipeline.finetune.trainer.max_steps=2",
           "pipeline.eval.eval.max_samples=3", "eval.max_new_tokens=3",
           f"hydra.run.dir={tmp_path}")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report) == {"baseline", "sequential", "parallel"}
    for row in report.values():
        assert row["processes"] == 2 and row["n_questions"] == 12
        assert sum(r["n_questions"] for r in row["ranks"]) == 12
    assert len(predictions(tmp_path)) == 3 * 12


def fsdp_launch(*args, script="run.py", processes=2, env=None, timeout=600):
    """``accelerate launch --config_file accelerate/fsdp.yaml --num_processes <processes>
    <script> *args``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           "accelerate/fsdp.yaml", "--num_processes", str(processes), "--main_process_port",
           str(free_port()), script, *args]
    return run_checked(cmd, timeout, env)


def check_fsdp_resumes_exactly(run_dir, launch_run, extra=(), tolerance=1e-5):
    """FSDP trains 4 steps with checkpoints at 2 and 4 (weights whole, optimizer sharded); the
    run is then cut on disk (no model/, a shard of checkpoint 4 lost, metrics after step 2
    dropped) and ``trainer.resume=auto`` must skip the damaged checkpoint, resume from step 2
    and reach the same losses. ``launch_run(*args)`` starts the processes."""
    args = ["stage=pretrain", *TINY, "trainer.max_steps=4", "trainer.save_every=2",
            "trainer.eval_every=0", "trainer.threads=1", "trainer.keep_checkpoints=5",
            "trainer.lr=3e-3", *extra, f"hydra.run.dir={run_dir}"]
    launch_run(*args)
    want = read_metrics(run_dir)
    assert sorted(want) == [1, 2, 3, 4]
    shards = sorted((run_dir / "checkpoints" / "step_0000004" / "optimizer").glob("*.distcp"))
    assert len(shards) >= 1  # one per process: the optimizer state was saved sharded
    assert not (run_dir / "checkpoints" / "step_0000004" / "optimizer.pt").exists()
    shutil.rmtree(run_dir / "model")
    shards[-1].unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= 2]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    out = launch_run(*args, "trainer.resume=auto")
    assert f"optimizer/{shards[-1].name} is missing" in out.stdout  # the lost shard, by name
    got = read_metrics(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step]["train/loss"] == pytest.approx(want[step]["train/loss"],
                                                        abs=tolerance), step
    assert (run_dir / "model" / "model.safetensors").is_file()
    return want


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_saves_and_resumes_exactly(tmp_path):
    """FSDP2 through accelerate on two CPU processes (tests/fsdp_on_cpu.py lifts accelerate's
    GPU-only gate; everything else is the real run.py): sharded optimizer checkpoints, resumed
    to the same losses; a checkpoint of one kind refuses to resume a run of the other."""
    from tests.test_cli import cli

    run_dir = tmp_path / "fsdp"
    check_fsdp_resumes_exactly(run_dir, lambda *a: fsdp_launch(*a, script="tests/fsdp_on_cpu.py"))
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert [r["params"] for r in ranks] == [None, None]  # sharded: no per-process checksum
    out = cli("stage=pretrain", *TINY, "trainer.max_steps=4", "trainer.eval_every=0",
              f"trainer.resume={run_dir / 'checkpoints' / 'step_0000002'}",
              run_dir=tmp_path / "ddp", check=False)
    assert out.returncode == 2 and "optimizer state of an FSDP run" in out.stderr
