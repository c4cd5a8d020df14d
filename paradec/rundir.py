"""Run directories: a training run owns its directory, and never mixes with another run.

Invariant: a training run holds an exclusive lock on ``<run dir>/.paradec.lock`` for as long as it
lives (``fcntl.flock``: the operating system drops it when the process ends, however it ends), so
a second live run in the same directory refuses at start-up, naming the holder. The directory
records the id of the run that owns it (``run_id``) and every checkpoint records it too, so
``trainer.resume=auto`` resumes only that run's checkpoints. A fresh run into a directory that
holds an earlier run's artefacts refuses, unless ``trainer.overwrite=true``: then the artefacts are
first moved aside into ``replaced-<time>/``, never mixed with the new ones. Every place the run
will write is checked before any training time is spent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK_FILE = ".paradec.lock"
RUN_ID_FILE = "run_id"
# What a training run writes into its directory (Hydra's .hydra/ and logs are Hydra's own).
ARTEFACTS = ("checkpoints", "model", "model_merged", "base_model", "metrics.jsonl")
# Directories a run creates inside its run dir: each must be a writable directory or absent.
WRITTEN_DIRS = ("checkpoints", "model", "model_merged", "base_model")


class RunDirError(ValueError):
    """A run directory that this run may not use; the message says why and what to do."""


def _writable(path: Path) -> str | None:
    """Why ``path`` (a directory) cannot be written, or None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create it ({err.strerror or err})"
    if not path.is_dir():
        return "it exists and is not a directory"
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot write in it ({err.strerror or err})"
    return None


def check_writable(run_dir: Path) -> None:
    """The run dir and every directory the run will create in it are writable, or an error."""
    problem = _writable(run_dir)
    if problem:
        raise RunDirError(f"run dir {run_dir}: {problem}; choose another hydra.run.dir")
    for name in WRITTEN_DIRS:
        sub = run_dir / name
        if sub.exists() or sub.is_symlink():
            problem = _writable(sub) if sub.is_dir() else "it exists and is not a directory"
            if problem:
                raise RunDirError(f"{sub}: {problem}; the run writes there")


def _acquire(run_dir: Path) -> IO:
    handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(f"run dir {run_dir} is in use by another run ({holder}); wait for it "
                          "to end or choose another hydra.run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    return handle


def read_run_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    return path.read_text().strip() or None if path.is_file() else None


def _move_aside(run_dir: Path, names: list[str]) -> Path:
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir()
    for name in names:
        (run_dir / name).rename(aside / name)
    return aside


@dataclass
class RunDir:
    """A locked run directory: its path, the owning run's id (None until :meth:`start`, or for
    a directory no run has owned yet), and the held lock."""

    path: Path
    run_id: str | None
    lock: IO | None = None

    def start(self, *, resuming: bool, overwrite: bool) -> str:
        """Make the directory this run's: ``resuming`` keeps its run id (the run continues its
        own checkpoints); a fresh run needs a directory without artefacts, or ``overwrite`` to
        move them aside first, and gets a new id. Returns the run id."""
        if not resuming:
            found = [name for name in ARTEFACTS if (self.path / name).exists()]
            if found and not overwrite:
                raise RunDirError(
                    f"run dir {self.path} holds an earlier run's {', '.join(found)}: continue it "
                    "with trainer.resume=auto, choose another hydra.run.dir, or replace it with "
                    "trainer.overwrite=true (the old artefacts are moved aside)")
            if found:
                aside = _move_aside(self.path, found)
                log.warning("trainer.overwrite=true: moved the earlier run's %s to %s",
                            ", ".join(found), aside)
            self.run_id = None
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex[:12]
            (self.path / RUN_ID_FILE).write_text(self.run_id + "\n")
        return self.run_id

    def release(self) -> None:
        if self.lock is not None:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            self.lock = None


def lock(run_dir: Path) -> RunDir:
    """Check that the run can write where it will, then lock ``run_dir`` for this process."""
    run_dir = Path(run_dir)
    check_writable(run_dir)
    return RunDir(run_dir, read_run_id(run_dir), _acquire(run_dir))
