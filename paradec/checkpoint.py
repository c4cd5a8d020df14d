"""Training checkpoints: atomic, complete, verified before use, loadable without pickle.

Invariant: a directory named ``checkpoints/step_NNNNNNN`` is complete when written. It is written
under a temporary name and renamed in one step, so a run killed mid-write leaves only a ``.tmp-*``
directory that :func:`latest_checkpoint` never picks; its ``manifest.json`` (the size of every
file, written last) lets a checkpoint damaged afterwards (a truncated or missing file) be found,
reported by name and skipped for the newest intact one. Weights are safetensors
(``save_pretrained``); optimizer and scheduler states load with ``torch.load(weights_only=True)``;
RNG states, the data position, the run id, the wandb run id, the resolved config and the git
commit are JSON.

Under FSDP the optimizer state stays sharded: every process writes its shard into the staging
directory's ``optimizer/`` (``torch.distributed.checkpoint``: one file per process and a
``.metadata``) before the main process writes the rest, the manifest (which then lists the
shards too) and renames the directory. Loading reshards, so an FSDP run may resume on another
number of processes. The weights are saved whole in either case (``model/``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{7,})$")
MANIFEST = "manifest.json"
OPTIMIZER_FILE = "optimizer.pt"  # the whole optimizer state (one process, DDP)
SHARDED_OPTIMIZER = "optimizer"  # the optimizer state, one shard per process (FSDP)

log = logging.getLogger(__name__)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def git_commit() -> str | None:
    """The commit of the code that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def rng_state() -> dict:
    """Python, numpy and torch RNG states as JSON-able values plus one tensor."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def set_rng_state(state: dict, torch_state: torch.Tensor | None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


def staging_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is renamed to its final name."""
    return Path(root) / f".tmp-{step_dir(root, step).name}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """An empty staging directory for ``step`` (what a killed write left there is removed)."""
    tmp = staging_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(root: Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    trainer_state: dict, keep_last: int = 2, state_dict: dict | None = None,
                    sharded_optimizer: bool = False) -> Path:
    """Write a complete checkpoint for ``step`` atomically; keep only the newest ``keep_last``.

    ``sharded_optimizer``: every process has already written its shard of the optimizer state
    into the staging directory (:func:`begin_checkpoint`, :func:`save_sharded_optimizer`);
    ``optimizer`` is then not saved here."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = staging_dir(root, step) if sharded_optimizer else begin_checkpoint(root, step)
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    if not sharded_optimizer:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    state = {**trainer_state, "step": step, "rng": rng_state(), "git_commit": git_commit()}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
    sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*"))
             if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1))
    if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_optimizer(model, optimizer, directory: Path) -> None:
    """Every process writes its shard of the optimizer state of an FSDP ``model`` to
    ``directory``; a collective call (every process, together)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(directory))


def load_sharded_optimizer(model, optimizer, directory: Path) -> None:
    """Restore, in place, the optimizer state that :func:`save_sharded_optimizer` wrote (on any
    number of processes: each reads the parts of the shards it now holds); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def has_sharded_optimizer(path: Path) -> bool:
    """Whether checkpoint ``path`` holds a sharded (FSDP) optimizer state."""
    return (Path(path) / SHARDED_OPTIMIZER).is_dir()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` against its manifest, or None when intact."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (incomplete, or written by an older paradec)"
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable manifest.json ({err})"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def checkpoint_run_id(path: Path) -> str | None:
    try:
        return json.loads((Path(path) / "trainer_state.json").read_text()).get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


def latest_checkpoint(root: Path, run_id: str | None = None) -> Path | None:
    """The newest intact checkpoint under ``root`` (of run ``run_id`` when given); a damaged
    one is reported by name and skipped."""
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is not None:
            log.warning("skipping checkpoint %s: %s", path, problem)
            continue
        if run_id is not None and checkpoint_run_id(path) != run_id:
            log.warning("skipping checkpoint %s: it belongs to run %s, not to this run dir's "
                        "run %s", path, checkpoint_run_id(path), run_id)
            continue
        return path
    return None


def load_training_state(path: Path, optimizer, scheduler) -> dict:
    """Restore optimizer (``None``: restored by :func:`load_sharded_optimizer`), scheduler and
    RNG states in place; return the trainer state dict."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a paradec checkpoint (no trainer_state.json)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"checkpoint {path} is damaged: {problem}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    set_rng_state(state["rng"], torch.load(path / "rng.pt", weights_only=True)["torch"])
    return state
