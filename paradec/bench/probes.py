"""Probes behind the benchmark's explanations: one attention layer under the columnar mask, where
a parallel decode step spends its time, and how fast a few-row matmul streams its weights.

Invariant: each probe times the thing it names in this process, after a warm-up, as a median of
repeats on the wall clock; it reports, never asserts.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import BenchConfig, CollatorConfig
from ..masks import columnar_mask, model_attention_mask


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Heads(nn.Module):
    """What an attention function reads from its module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def attention_layer(length: int = 4096, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
                    branches: int = 8, repeats: int = 3) -> dict:
    """Seconds of one attention layer's forward + backward over a pretraining layout of
    ``length`` tokens (a background of a quarter, then ``branches`` branches): transformers'
    sdpa with the dense columnar mask, paradec's columnar sdpa with the same mask, and
    transformers' sdpa with ``is_causal`` (no mask) on the same tensors."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..attention import COLUMNAR_SDPA, columnar_sdpa_forward
    from ..layout import build_layout
    from .training_step import training_sample

    layout = build_layout([training_sample(length, branches, 100, 0)])
    bool_mask = columnar_mask(layout.column, layout.valid)
    float_mask = model_attention_mask(bool_mask, COLUMNAR_SDPA, torch.float32)
    L = layout.input_ids.shape[1]
    module = _Heads(heads // kv_heads)
    shapes = ((heads, L), (kv_heads, L), (kv_heads, L))
    tensors = [torch.randn(1, n, h, head_dim).transpose(1, 2).requires_grad_()
               for h, n in shapes]

    def run(fn, mask):
        def once():
            out = fn(module, *tensors, mask)[0]
            out.sum().backward()
        return _median_s(once, repeats)

    return {"length": L, "transformers_sdpa_dense_mask_s": run(sdpa_attention_forward, bool_mask),
            "columnar_sdpa_s": run(columnar_sdpa_forward, float_mask),
            "is_causal_s": run(sdpa_attention_forward, None)}


def parallel_step_profile(preset: str = "minimind2_small", context: int = 4096,
                          branches: int = 8, steps: int = 10) -> list[tuple[str, float]]:
    """``(op, share of CPU time)`` of ``steps`` bare parallel decode steps (model forwards with
    their real masks and growing KV cache; :class:`paradec.bench.decode.BareForwards`), the
    largest first."""
    from torch.profiler import ProfilerActivity, profile

    from ..kv_cache import reserved_cache
    from .decode import BareForwards, first_k, make_contexts
    from .stage import preset_model

    model = preset_model(preset)[0].eval()
    vocab = int(model.config.vocab_size)
    cfg = BenchConfig(contexts=1, context_lengths=[context], branches=[branches])
    sample = first_k(make_contexts(cfg, vocab, context), branches)[0]
    bare = BareForwards(model, sample, steps + 1, CollatorConfig(), 0, vocab)
    bare.run()  # warm-up: a whole decode
    with torch.no_grad():
        cache = reserved_cache(model, bare.cache_tokens)
        kwargs = models.cache_kwargs(model, cache)
        model(**bare.prefill, **kwargs, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in bare.steps:
                model(**step, **kwargs, use_cache=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sorted(((e.key, e.self_cpu_time_total / total) for e in events),
                  key=lambda pair: -pair[1])


def matmul_streaming(out_features: int = 4096, in_features: int = 4096,
                     rows=(1, 8, 64), repeats: int = 10) -> list[tuple[int, float]]:
    """``(rows, weight bytes streamed per second)`` of ``F.linear`` of a few rows against an
    ``out x in`` fp32 weight far larger than the caches."""
    weight = torch.randn(out_features, in_features)
    nbytes = weight.numel() * weight.element_size()
    out = []
    for n in rows:
        x = torch.randn(n, in_features)
        out.append((n, nbytes / _median_s(lambda: F.linear(x, weight), repeats)))
    return out
