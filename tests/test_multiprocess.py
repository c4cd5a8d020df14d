"""Two processes (accelerate launch, gloo on CPU) run the one training loop: each rank reads
different batches, parameters stay identical, and the run has one metrics.jsonl, one wandb run,
one checkpoints dir and one model/, in the main process's run dir.

On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` starts two CPU
processes with torchrun; ``accelerate launch --cpu --num_processes 2`` does NOT (without
``--mpirun_hostfile`` it starts a single process), see docs/scaling.md.
"""

import json
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


def launch(*args, timeout=400):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "run.py", *args]
    env = {**ENV, "PARADEC_RANK_REPORT": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


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


def test_two_processes_evaluate_once(two_process_run, tmp_path):
    tiny = [o for o in TINY if not o.startswith("logger")]
    model = two_process_run / "rank0" / "model"
    ev = tmp_path / "ev"
    launch("stage=eval", f"model.path={model}", *tiny, "logger.mode=offline",
           "eval.max_samples=2", "eval.max_new_tokens=3", f"hydra.run.dir={ev}")
    assert list(json.loads((ev / "eval.json").read_text())) == ["baseline", "sequential",
                                                                "parallel"]
    assert len(wandb_runs(ev)) == 1
    lines = (ev / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len({(json.loads(line)["id"], json.loads(line)["mode"]) for line in lines})
