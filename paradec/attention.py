"""Scaled dot-product attention for columnar masks: the work a mask rules out is never done.

Invariant: :func:`columnar_sdpa_forward` returns what transformers' ``sdpa`` returns for the same
query, keys, values and mask (up to float rounding); it only chooses how the work is cut. Three
savings, all exact:

- **The context runs causal.** The leading rows whose mask is exactly causal (the background of
  a columnar layout: one token per column, branch 0) go to the kernel's own ``is_causal`` path,
  as a plain model's prefill does.
- **Keys no query attends are skipped.** The other queries go in chunks of :data:`QUERY_CHUNK`
  rows, and a chunk attends only the keys up to the last one any of its rows may see. In the
  interleaved layout (DESIGN section 1) a token attends no key after itself, so a training step
  or a prefill costs about what a causal one costs instead of the full square; any other mask
  is still right, only less is saved. The CPU kernel with a dense mask computes every block.
- **Grouped-query attention without copying the KV heads.** transformers' ``sdpa`` repeats every
  cached key and value head for each query head of its group whenever a mask is given and more
  than one token is fed: a column step of K branches would copy the whole KV cache in every
  layer. Here, for a few queries (a column step), the group's query heads become rows against
  their one KV head, with the small head-shared mask repeated for them; for many (a prefill, a
  training step) each member of a group is one call against the KV heads with the same mask
  tensor, so nothing is copied and the backward keeps the mask once.

Everything else (no mask, a mask not shaped ``[B, 1, Lq, Lk]``, dropout, a position bias,
attention weights asked for) goes to transformers' own ``sdpa`` unchanged, so a model patched
with it is the plain model for the unpatched modes.
Registered as :data:`COLUMNAR_SDPA` with transformers' ``AttentionInterface`` (and ``sdpa``'s
mask builder), which is what a columnar model runs when ``model.attn_implementation=sdpa``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

COLUMNAR_SDPA = "paradec_sdpa"
# Rows of queries per kernel call when keys can be skipped: small enough that a chunk's keys end
# close to its own rows (the saving), large enough that the kernel stays efficient (one layer of
# a 4K-token training step is then within 12% of is_causal: python -m paradec.bench attention).
QUERY_CHUNK = 256


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where a mask lets a query attend: True in a bool mask, above the dtype's minimum (the
    fill of a blocked key) in an additive float one."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min


@dataclass(frozen=True)
class Plan:
    """How to cut the attention of a mask ``[B, 1, Lq, Lk]``."""

    causal: int  # leading query rows that see exactly keys 0..i (in every batch row): one is_causal call
    chunks: tuple  # (first row, end row, end key) of each later chunk of rows


def causal_rows(mask: torch.Tensor) -> int:
    """How many leading rows ``i`` of a square mask see exactly the keys ``0..i``, in every
    batch row (the context of a columnar layout: branch 0, one token per column)."""
    seen = allowed(mask[:, 0])
    # Row i sees exactly 0..i: no key after i, none blocked up to i (bool passes only: a sum
    # over a bool tensor widens it to int64 and costs as much as the rest together).
    later = torch.triu(seen, 1).any(-1)
    missing = torch.tril(~seen).any(-1)
    exact = ~(later | missing)
    return int(exact.all(0).to(torch.long).cumprod(0).sum())


def attention_plan(mask: torch.Tensor, chunk: int) -> Plan:
    """The causal rows of ``mask`` (when it is square), then chunks of ``chunk`` rows, each
    with one past the last key any of its rows (in any batch row) may attend. One host sync;
    the plan of the mask a forward passes to every layer is kept for the next layers (for that
    very tensor, unchanged: a later mask at the same address is planned anew)."""
    last, version, last_chunk, plan = _last_plan
    if last is not None and last() is mask and version == mask._version and last_chunk == chunk:
        return plan
    Lq, Lk = mask.shape[2], mask.shape[3]
    causal = causal_rows(mask) if Lq == Lk else 0
    starts = range(causal, Lq, chunk)
    ends = []
    if starts:
        reach = torch.stack([allowed(mask[:, 0, a:a + chunk]).any(1).any(0) for a in starts])
        ends = (Lk - reach.flip(-1).to(torch.uint8).argmax(-1)).tolist()  # the last True, + 1
    plan = Plan(causal, tuple((a, min(a + chunk, Lq), end) for a, end in zip(starts, ends)))
    _last_plan[:] = [weakref.ref(mask), mask._version, chunk, plan]
    return plan


# (a weak reference to the mask, its version, the chunk, its plan): every layer of a forward gets
# the same mask tensor; a freed one's reference is dead, so its address can never match again.
_last_plan: list = [None, None, None, None]


def _attend(query, key, value, mask, scale):
    """sdpa of ``query [B, H, n, d]`` against ``key``/``value`` ``[B, Hkv, S, d]`` under the
    head-shared ``mask [B, 1, n, S]``, without repeating a KV head."""
    B, H, n, d = query.shape
    groups = H // key.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    if n * groups <= QUERY_CHUNK and not (torch.is_grad_enabled() and query.requires_grad):
        # A few queries (a column step): query heads g * groups + r share KV head g, so they
        # are rows (r, token) of one call per KV head, the small mask repeated for them.
        rows = query.reshape(B, key.shape[1], groups * n, d)
        out = F.scaled_dot_product_attention(rows, key, value,
                                             attn_mask=mask.repeat(1, 1, groups, 1), scale=scale)
        return out.reshape(B, H, n, d)
    # Many queries, or a backward to come: one call per member r of a group (query heads r,
    # r + groups, ... with KV heads 0, 1, ...), each with the same mask tensor, so neither the
    # mask nor the cache is copied (and the backward keeps the mask once).
    parts = [F.scaled_dot_product_attention(query[:, r::groups], key, value, attn_mask=mask,
                                            scale=scale) for r in range(groups)]
    return torch.stack(parts, 2).reshape(B, H, n, d)


def columnar_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: ``query [B, H, Lq, d]``, ``key``/``value``
    ``[B, Hkv, Lk, d]``, a bool or additive float ``attention_mask``; returns
    ``(output [B, Lq, H, d], None)`` (see the module docstring)."""
    mask = attention_mask
    plain = (mask is None or mask.dim() != 4 or mask.shape[1] != 1
             or mask.shape[2:] != (query.shape[2], key.shape[2])
             or dropout or kwargs.get("position_bias") is not None
             or kwargs.get("output_attentions") or query.shape[1] % key.shape[1])
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if query.shape[2] <= QUERY_CHUNK:  # a column step, a short prefill
        out = _attend(query, key, value, mask, scaling)
    else:
        plan = attention_plan(mask, QUERY_CHUNK)
        parts = []
        if plan.causal:  # the context: exactly causal, so the kernel's own causal path
            c = plan.causal
            parts.append(F.scaled_dot_product_attention(
                query[:, :, :c], key[:, :, :c], value[:, :, :c], is_causal=True, scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1]))
        parts += [_attend(query[:, :, a:b], key[:, :, :end], value[:, :, :end],
                          mask[..., a:b, :end], scaling) for a, b, end in plan.chunks]
        out = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(COLUMNAR_SDPA, columnar_sdpa_forward)
AttentionMaskInterface.register(COLUMNAR_SDPA, sdpa_mask)


def columnar_kernel(attn_implementation: str | None) -> str | None:
    """What a columnar model runs for ``model.attn_implementation``: :data:`COLUMNAR_SDPA` for
    ``sdpa``; other implementations (eager, flex_attention) as they are."""
    return COLUMNAR_SDPA if attn_implementation == "sdpa" else attn_implementation


def use_columnar_sdpa(model: nn.Module) -> None:
    """Run ``model`` (unwrapped, e.g. from peft) with :func:`columnar_kernel` of its
    implementation."""
    current = getattr(model.config, "_attn_implementation", None)
    if columnar_kernel(current) != current:
        model.set_attn_implementation(columnar_kernel(current))
