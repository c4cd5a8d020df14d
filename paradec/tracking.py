"""Where metrics go: ``metrics.jsonl`` always, and wandb on the main process when enabled.

Invariant: every logged dict lands in ``metrics.jsonl`` (one JSON object per call, flushed), so a
run can be read offline with no wandb account; wandb is started only on the main process, named
from the Hydra overrides, grouped by the multirun sweep, and always finished (also on errors), so
multirun jobs never merge into one run. No secret is ever written: wandb reads its key from its
own settings or the environment, never from the config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` = online when wandb has an API key (env or netrc), else offline."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode must be one of {list(WANDB_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        hosts = netrc.netrc().hosts
        if any("wandb" in host for host in hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class Tracker:
    """Writes metrics to ``<run_dir>/metrics.jsonl`` and (main process only) to wandb."""

    def __init__(self, run_dir: Path, *, main_process: bool = True, logger_cfg=None,
                 config: dict | None = None, job_type: str = "train", name: str | None = None,
                 group: str | None = None, resume_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.main = main_process
        self.wandb_run = None
        self._file = None
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        mode = resolve_wandb_mode(getattr(logger_cfg, "mode", "disabled") if logger_cfg else "disabled")
        if mode == "disabled":
            return
        import wandb

        self.wandb_run = wandb.init(
            project=logger_cfg.project, entity=logger_cfg.entity, mode=mode,
            dir=str(self.run_dir), config=config, job_type=job_type, name=name, group=group,
            tags=list(logger_cfg.tags or []), id=resume_id, resume="allow" if resume_id else None,
            reinit="finish_previous")
        log.info("wandb run %s (%s mode) in %s", self.wandb_run.id, mode, self.run_dir)

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.main:
            return
        record = {"step": step, **metrics} if step is not None else dict(metrics)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, exit_code: int = 0) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish(exit_code=1 if exc_type else 0)
        return False
