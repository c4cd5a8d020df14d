"""Resumable, sharded streams of dataset items for the training loop.

Invariant: the sequence of batches is a pure function of (dataset, seed, batch size, rank, world
size), and :meth:`BatchStream.state_dict` captures exactly how far along it is, so a resumed run
sees the same batches as a run that was never stopped. Map-style datasets are reshuffled every
epoch with ``seed + epoch``; iterable (streaming) datasets are consumed in order and skipped
forward on resume. Each rank takes every ``world_size``-th item, so ranks never see the same item.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset


class BatchStream:
    """An endless iterator over lists of ``batch_size`` items (the collator turns them into a Layout)."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.iterable = isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__")
        self.epoch = 0
        self.position = 0  # batches already taken in this epoch (map-style) / in total (iterable)
        self._iter: Iterator[list[Any]] | None = None
        if not self.iterable and len(dataset) < world_size * batch_size:
            raise ValueError(
                f"the dataset has {len(dataset)} items, fewer than one batch per process "
                f"({world_size} x batch_size {batch_size})")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iter = None

    def _epoch_order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        per_rank = n // self.world_size  # equal shards keep the ranks in lock-step
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _map_batches(self) -> Iterator[list[Any]]:
        while True:
            order = self._epoch_order()
            n_batches = len(order) // self.batch_size
            for b in range(self.position, n_batches):
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                self.position = b + 1
                yield [self.dataset[i] for i in idx]
            self.epoch += 1
            self.position = 0

    def _iterable_batches(self) -> Iterator[list[Any]]:
        while True:
            items = itertools.islice(iter(self.dataset), self.rank, None, self.world_size)
            batches = iter(lambda: list(itertools.islice(items, self.batch_size)), [])
            full = (b for b in batches if len(b) == self.batch_size)
            got_any = False
            for batch in itertools.islice(full, self.position, None):
                got_any = True
                self.position += 1
                yield batch
            if not got_any and self.position == 0:
                raise ValueError("the streaming dataset yielded less than one batch")
            self.epoch += 1
            self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[Any]:
        if self._iter is None:
            self._iter = self._iterable_batches() if self.iterable else self._map_batches()
        return next(self._iter)


def fixed_batches(dataset, batch_size: int, max_batches: int, rank: int = 0,
                  world_size: int = 1) -> Iterator[list[Any]]:
    """The first ``max_batches`` batches of ``dataset`` in order (the last may be short):
    validation always sees the same items, however small the dataset."""
    items = iter(dataset) if not hasattr(dataset, "__len__") else (
        dataset[i] for i in range(len(dataset)))
    mine = itertools.islice(items, rank, None, world_size)
    for _ in range(max_batches):
        batch = list(itertools.islice(mine, batch_size))
        if not batch:
            return
        yield batch
