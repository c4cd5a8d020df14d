"""Data tasks: raw datasets -> branches and samples for the columnar collator.

Invariant: every task has the same small interface, so training and evaluation never special-case
a dataset::

    task = load_task(data_cfg)                 # conf/data/<name>.yaml; bad input -> DataError
    task.kinds                                 # supported kinds, the first is the default
    task.texts(split="train") -> Iterator[str] # raw text (train a from-scratch tokenizer first)
    task.dataset(split, tokenizer, kind, branches_per_sample) -> torch Dataset / IterableDataset
      kind="text": items are Branch(prompt=[], target=chunk ids); the collator groups them
      kind="qa":   items are BranchSample(background, branches, meta) with the questions of one
                   context (at most branches_per_sample); meta has context_id, ids, questions,
                   answers (all gold answers), impossible, truncated

Splits are ``train``, ``validation`` and ``test`` (fineweb: train and a held-out validation
slice). Every problem with the input data raises :class:`DataError` (one line naming the file and
record) when the task or dataset is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol, Union

from .fineweb import FinewebDataConfig, FinewebTask
from .io import DataError
from .qa import QATemplate
from .squad import SquadDataConfig, SquadTask
from .synthetic import SyntheticDataConfig, SyntheticTask

DATA_SCHEMAS = {
    "synthetic": SyntheticDataConfig,
    "squad": SquadDataConfig,
    "fineweb": FinewebDataConfig,
}
TASKS = {"synthetic": SyntheticTask, "squad": SquadTask, "fineweb": FinewebTask}

DataConfig = Union[SyntheticDataConfig, SquadDataConfig, FinewebDataConfig]


class Task(Protocol):
    """What every data task provides (see the module docstring)."""

    kinds: tuple[str, ...]

    def texts(self, split: str = "train") -> Iterator[str]: ...

    def dataset(self, split: str, tokenizer, kind: str, branches_per_sample: int): ...


def _build(schema: type, values: dict, prefix: str):
    """A dataclass from a plain dict, recursing into dataclass fields; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown key for {schema.__name__} "
                         f"(known: {', '.join(fields)})")
    kwargs = {}
    for name, value in values.items():
        inner = fields[name].default_factory if dataclasses.is_dataclass(
            fields[name].default_factory) else None
        if inner is not None and isinstance(value, dict):
            value = _build(inner, value, f"{prefix}.{name}")
        kwargs[name] = value
    return schema(**kwargs)


def data_config(cfg: Any) -> DataConfig:
    """The typed data config from a dataclass, a DictConfig or a dict (which must have ``name``)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is optional for library use
        pass
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ValueError("data config needs a 'name' (one of "
                         f"{', '.join(DATA_SCHEMAS)}), got {cfg!r}")
    if cfg["name"] not in DATA_SCHEMAS:
        raise ValueError(f"data.name: unknown task {cfg['name']!r} "
                         f"(known: {', '.join(DATA_SCHEMAS)})")
    return _build(DATA_SCHEMAS[cfg["name"]], dict(cfg), "data")


def load_task(cfg: Any) -> Task:
    """The task named by ``cfg.name``, built from its config (validated; local files checked)."""
    cfg = data_config(cfg)
    return TASKS[cfg.name](cfg)


__all__ = ["DATA_SCHEMAS", "TASKS", "DataError", "DataConfig", "QATemplate", "Task",
           "FinewebDataConfig", "SquadDataConfig", "SyntheticDataConfig",
           "FinewebTask", "SquadTask", "SyntheticTask", "data_config", "load_task"]
