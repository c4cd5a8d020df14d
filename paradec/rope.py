"""2D RoPE for transformers models: some frequency pairs rotate by branch, all others by column.

Invariant (DESIGN section 1): a rotary head with ``n`` frequency pairs numbers them ``1..n``
(1-based, pair 1 = highest frequency = ``inv_freq[0]``; in the rotate-half layout pair ``k`` is
dims ``k-1`` and ``k-1+n``). Pairs listed in ``pair_indices`` rotate by ``branch_pos`` (=
``branch * branch_stride``, 0 for the background); every other pair rotates by the token's
``column``. Nothing ever rotates by the flat index of a token in the sequence. With
``pair_indices=[]`` a patched model on a one-branch layout computes exactly what the unpatched
model computes on the same tokens.

How: every transformers causal LM computes ``(cos, sin)`` once per forward in one rotary module
(``model.model.rotary_emb``, ``model.gpt_neox.rotary_emb``) from ``position_ids``. We replace that
module by :class:`ColumnarRotaryEmbedding`, which takes ``position_ids`` shaped ``[B, L, 2]`` =
``(branch_pos, column)`` (the layout's ``pos2d``) passed with the forward call. The replacement
survives peft, ``.to()`` and the KV cache. The settings are stored in ``model.config.columnar``, so
``save_pretrained`` writes them and :func:`maybe_patch_from_config` re-applies them after loading.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from .attention import use_columnar_sdpa
from .layout import BRANCH_STRIDE

CONFIG_KEY = "columnar"
# RoPE types whose frequencies depend on the sequence length seen in the forward call: with column
# positions that "length" is meaningless, and they rewrite ``inv_freq`` behind our back.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
# Attribute paths of the rotary module inside a causal LM (after unwrapping peft).
ROTARY_PATHS = ("model.rotary_emb", "gpt_neox.rotary_emb", "transformer.rotary_emb")


class ColumnarRotaryEmbedding(nn.Module):
    """Drop-in replacement for a transformers rotary module, computing 2D RoPE.

    ``forward(x, position_ids)`` takes ``position_ids`` as ``[B, L, 2]`` long =
    ``(branch_pos, column)``, or a plain ``[B, L]`` / ``[1, L]`` tensor of columns (then every
    token has ``branch_pos`` 0, so an ordinary call still works). Returns ``(cos, sin)`` of shape
    ``[B, L, 2 * n_pairs]`` in ``x.dtype``, exactly like the module it replaces.
    """

    def __init__(self, original: nn.Module, pair_indices: Sequence[int] = ()):
        super().__init__()
        inv_freq = original.inv_freq.detach().clone()
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.attention_scaling = float(getattr(original, "attention_scaling", 1.0))
        # Kept for introspection by code that reads them from the rotary module.
        self.rope_type = getattr(original, "rope_type", "default")
        self.config = getattr(original, "config", None)
        self.branch_pairs = nn.Buffer(torch.zeros(inv_freq.shape[0], dtype=torch.bool),
                                      persistent=False)
        self.set_pairs(pair_indices)

    @property
    def num_pairs(self) -> int:
        return int(self.inv_freq.shape[0])

    @property
    def pair_indices(self) -> list[int]:
        """The 1-based pairs that rotate by ``branch_pos``."""
        return (self.branch_pairs.nonzero().flatten() + 1).tolist()

    def set_pairs(self, pair_indices: Sequence[int]) -> None:
        """Select the (validated, 1-based) pairs that rotate by ``branch_pos``."""
        check_pair_indices(pair_indices, self.num_pairs)
        selected = torch.zeros(self.num_pairs, dtype=torch.bool, device=self.inv_freq.device)
        selected[[k - 1 for k in pair_indices]] = True
        self.branch_pairs.copy_(selected)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, **kwargs):
        if position_ids.dim() == 3:
            branch_pos, column = position_ids[..., 0], position_ids[..., 1]
        else:
            column = position_ids
            branch_pos = torch.zeros_like(column)
        # One selection over all pairs at once: [B, L, n] positions, branch_pos where selected.
        pos = torch.where(self.branch_pairs, branch_pos[..., None], column[..., None])
        freqs = pos.float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: pair k = dims k-1, k-1+n
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"num_pairs={self.num_pairs}, pair_indices={self.pair_indices}"


def check_pair_indices(pair_indices: Sequence[int], num_pairs: int) -> None:
    """Raise a ValueError naming ``model.pair_indices`` unless every index is a distinct 1..n."""
    valid = f"valid pair indices are 1..{num_pairs} (1 = highest frequency)"
    for k in pair_indices:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_pairs:
            raise ValueError(f"model.pair_indices: {k!r} is out of range; {valid}")
    if len(set(pair_indices)) != len(pair_indices):
        raise ValueError(f"model.pair_indices: {list(pair_indices)} lists a pair twice")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / FSDP (``.module``), torch.compile and peft wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None and isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module  # DistributedDataParallel, FSDP (v1), accelerate wrappers
        if inner is None:
            break
        model = inner
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _find_rotary(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute name, rotary module)`` of the model's one rotary module."""
    base = unwrap_model(model)
    for path in ROTARY_PATHS:
        parent_path, _, name = path.rpartition(".")
        parent = base
        for part in parent_path.split("."):
            parent = getattr(parent, part, None)
        rotary = getattr(parent, name, None) if parent is not None else None
        if rotary is not None and hasattr(rotary, "inv_freq"):
            return parent, name, rotary
    raise ValueError(
        f"cannot find the rotary module of {type(base).__name__} (looked at {ROTARY_PATHS}); "
        "columnar decoding needs a RoPE model with one shared rotary module")


def _check_rope_type(rotary: nn.Module) -> None:
    """Refuse RoPE variants whose frequencies change with the sequence length (or per layer)."""
    rope_type = getattr(rotary, "rope_type", "default")
    if isinstance(rope_type, dict):
        raise ValueError(
            f"per-layer-type RoPE ({rope_type}) is not supported by columnar decoding")
    if rope_type in DYNAMIC_ROPE_TYPES or "dynamic" in str(rope_type):
        raise ValueError(
            f"RoPE type {rope_type!r} is dynamic (its frequencies depend on the sequence length, "
            "which has no meaning with column positions) and cannot be patched for columnar "
            "decoding; static types (default, linear, yarn, llama3) work")


def patch_model(model: nn.Module, pair_indices: Sequence[int], branch_stride: int) -> nn.Module:
    """Replace the model's rotary module by :class:`ColumnarRotaryEmbedding` (in place).

    Idempotent: patching a patched model re-configures its pairs. Works through a peft wrapper.
    ``branch_stride`` does not enter the rotation (``pos2d`` already holds ``branch *
    branch_stride``); it is recorded with the pairs so a layout built with another stride is
    refused by :func:`paradec.models.forward_layout`. Returns ``model``.
    """
    if int(branch_stride) < 1:
        raise ValueError(f"model.branch_stride must be >= 1, got {branch_stride}")
    parent, name, rotary = _find_rotary(model)
    check_pair_indices(list(pair_indices), int(rotary.inv_freq.shape[0]))
    pair_indices = [int(k) for k in pair_indices]
    if isinstance(rotary, ColumnarRotaryEmbedding):
        rotary.set_pairs(pair_indices)
    else:
        _check_rope_type(rotary)
        setattr(parent, name, ColumnarRotaryEmbedding(rotary, pair_indices))
    # Columnar masks skip what they rule out (paradec.attention), where the model runs sdpa.
    use_columnar_sdpa(unwrap_model(model))
    # A plain dict attribute of the config: save_pretrained writes it into config.json.
    unwrap_model(model).config.columnar = {"pair_indices": pair_indices,
                                      "branch_stride": int(branch_stride)}
    return model


def is_patched(model: nn.Module) -> bool:
    """True when the model's rotary module computes 2D RoPE."""
    return isinstance(_find_rotary(model)[2], ColumnarRotaryEmbedding)


def columnar_settings(model: nn.Module) -> dict | None:
    """``{"pair_indices": [...], "branch_stride": int}`` stored in the config, or None."""
    settings = getattr(unwrap_model(model).config, CONFIG_KEY, None)
    return dict(settings) if settings else None


def maybe_patch_from_config(model: nn.Module) -> bool:
    """Re-apply the patch recorded in ``model.config.columnar`` (after loading); True if done."""
    settings = columnar_settings(model)
    if settings is None:
        return False
    patch_model(model, settings["pair_indices"], settings["branch_stride"])
    return True


def branch_step_angles(model_or_inv_freq, branch_stride: int) -> torch.Tensor:
    """Rotation (radians) of each pair per branch step: ``branch_stride * inv_freq``."""
    inv_freq = model_or_inv_freq
    if isinstance(model_or_inv_freq, nn.Module):
        inv_freq = _find_rotary(model_or_inv_freq)[2].inv_freq
    return branch_stride * inv_freq.float()


def suggest_pair_indices(model_or_inv_freq, branch_stride: int = BRANCH_STRIDE, n_pairs: int = 4,
                         min_angle: float = 0.25) -> list[int]:
    """The ``n_pairs`` lowest-frequency pairs that still turn >= ``min_angle`` per branch step.

    This is the rule behind the presets' default ``pair_indices``. Low-frequency pairs carry the
    least column information (their wavelengths are thousands of tokens; word order lives in the
    high-frequency pairs), so giving them to the branch costs the least. But the very lowest pairs
    turn only ~1e-4 rad per branch at ``branch_stride=128`` and ``rope_theta=1e6``: branches
    would be positionally indistinguishable, and a token could not tell its own branch's history
    from another branch's at the same column. Hence the floor ``min_angle``.
    """
    angles = branch_step_angles(model_or_inv_freq, branch_stride)
    ok = (angles >= min_angle).nonzero().flatten()
    ok = ok[angles[ok].argsort()][:n_pairs]  # smallest sufficient angles = lowest frequencies
    return sorted((ok + 1).tolist())
