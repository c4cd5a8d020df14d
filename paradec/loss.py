"""The columnar training loss.

Invariant (DESIGN section 1): ``layout.labels[b, i]`` is already the token that position ``i``
must predict (the next token of its own branch) or -100. So the loss is plain token
cross-entropy of ``logits[b, i]`` against ``labels[b, i]`` with **no shift**. A model's built-in
``labels=`` loss shifts by one flat position, which is wrong for any interleaved layout (the
flat "next" token belongs to another branch); paradec never passes ``labels=`` to a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import IGNORE_INDEX  # noqa: F401  (defined once, in the layout builder)

REDUCTIONS = ("mean", "sum")


def columnar_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy over labelled tokens, no shift. Returns ``(loss, n_tokens)``.

    ``logits`` ``[B, L, V]``, ``labels`` ``[B, L]`` (-100 = no label), or any matching shapes
    (e.g. ``[N, V]`` / ``[N]`` for logits kept only at labelled positions). ``reduction="mean"``
    averages over labelled tokens (0 when there are none, never NaN); ``"sum"`` returns the sum,
    which with ``n_tokens`` lets gradient accumulation / several devices average correctly.
    ``n_tokens`` is a 0-dim long tensor (no host sync). Computed in float32 for bf16 logits.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    n_tokens = (labels != IGNORE_INDEX).sum()
    if reduction == "sum":
        return total, n_tokens
    return total / n_tokens.clamp(min=1), n_tokens


def load_balancing_loss(router_logits, num_experts: int, top_k: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over real tokens (unscaled, like transformers').

    ``router_logits``: one ``[B*L, num_experts]`` tensor per MoE layer; ``valid`` ``[B, L]``
    excludes padding. transformers' own version takes the model's 2D padding mask, so it breaks
    on paradec's 4D columnar mask: :func:`paradec.models.forward_layout` calls this instead.
    Returns ``num_experts * sum_e f_e * P_e`` averaged over layers (``top_k`` when perfectly balanced).
    """
    logits = torch.stack([g.float() for g in router_logits])  # [layers, B*L, E]
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(-2).float()
    weight = (torch.ones(logits.shape[1], device=logits.device) if valid is None
              else valid.reshape(-1).to(logits.device, torch.float))
    denom = weight.sum().clamp(min=1)
    tokens_per_expert = (chosen * weight[:, None]).sum(1) / denom  # [layers, E], top-k fractions
    prob_per_expert = (probs * weight[:, None]).sum(1) / denom
    return num_experts * (tokens_per_expert * prob_per_expert).sum(-1).mean()
