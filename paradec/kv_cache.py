"""The decoders' KV cache: transformers' ``DynamicCache`` whose layers write into memory reserved
for the whole decode.

Invariant: a :func:`reserved_cache` returns exactly what a ``DynamicCache`` returns (the same keys
and values, the same lengths, the same ``batch_repeat_interleave`` / ``crop`` / ``reset``); only
where they live differs. ``DynamicCache`` concatenates every layer's whole cache with the new
tokens at each step: a decode step then copies the KV cache once more than it reads it, into a
freshly allocated tensor (on CPU, a large one comes from the kernel as zeroed pages, so the copy
runs at a fraction of the memory bandwidth). A :class:`ReservedLayer` allocates its buffer once,
for the tokens the decoder says it will hold, copies only the new tokens, and returns views of
the filled part. Past that reserve it still works: it grows by doubling.

Every decoder (parallel, prefix, ``generate`` for the others) and the benchmark's bare forwards
use it, so the modes compare on the same cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` over a buffer ``[B, H, capacity, d]``: ``keys``/``values`` are views
    of its first ``length`` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        if capacity < 0:
            raise ValueError(f"a KV cache reserve must be >= 0 tokens, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self._keys = self._values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        size = max(self.capacity, key_states.shape[-2])
        self._keys = key_states.new_empty(*key_states.shape[:2], size, key_states.shape[-1])
        self._values = value_states.new_empty(*value_states.shape[:2], size,
                                              value_states.shape[-1])
        self.length = 0
        self._expose()
        self.is_initialized = True

    def _expose(self) -> None:
        self.keys = self._keys[..., :self.length, :]
        self.values = self._values[..., :self.length, :]

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._keys.shape[-2])
        keys = self._keys.new_empty(*self._keys.shape[:2], size, self._keys.shape[-1])
        values = self._values.new_empty(*self._values.shape[:2], size, self._values.shape[-1])
        keys[..., :self.length, :] = self.keys
        values[..., :self.length, :] = self.values
        self._keys, self._values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._grow(end)
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        super().reset()
        self._keys = self._values = None
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self.length = max(self.length + tokens_to_remove, 0)
            self._expose()

    def _select_rows(self, rows) -> None:
        """Keep buffer rows ``rows`` (an index tensor): the reserve goes with them."""
        if self.is_initialized:
            rows = rows.to(self._keys.device)
            self._keys, self._values = self._keys[rows], self._values[rows]
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self._keys.shape[0], device=self._keys.device)
            self._select_rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)


def reserved_cache(model, tokens: int) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers reserve ``tokens`` positions
    per row (the prompt plus every new token); other layer kinds (a sliding window) are
    transformers' own."""
    cache = DynamicCache(config=model.config)
    cache.layers = [ReservedLayer(tokens) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
