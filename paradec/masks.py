"""The columnar attention mask, and its conversion for each attention implementation.

Invariant (DESIGN section 1): query i attends key j iff both are real and
``column_j < column_i``, or ``j == i``. A padding query attends to itself only, so no row is ever
fully masked (NaN-safe in every dtype). With ``isolate_branches`` a real query additionally sees
only the background (branch 0) and its own branch.

One rule, one function: :func:`columnar_mask_qk` handles queries against keys that may include a
KV cache (the decoder's step), and :func:`columnar_mask` is its square special case used for
training and prefill. Masks are ``[B, 1, Lq, Lk]``, shared by all heads; a per-head float mask is
never materialised.
"""

from __future__ import annotations

import torch

from .attention import COLUMNAR_SDPA

SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")


def columnar_mask_qk(
    q_column: torch.Tensor,
    q_valid: torch.Tensor,
    k_column: torch.Tensor,
    k_valid: torch.Tensor,
    q_branch: torch.Tensor | None = None,
    k_branch: torch.Tensor | None = None,
    isolate_branches: bool = False,
    q_offset: int = 0,
) -> torch.Tensor:
    """Bool mask ``[B, 1, Lq, Lk]`` for queries at key positions ``q_offset .. q_offset+Lq-1``.

    Keys are everything the attention sees (cache then new tokens); query i is key
    ``q_offset + i``, which is how "j == i" is decided.
    """
    earlier = k_column[:, None, :] < q_column[:, :, None]
    allowed = earlier & q_valid[:, :, None] & k_valid[:, None, :]
    if isolate_branches:
        if q_branch is None or k_branch is None:
            raise ValueError("isolate_branches=True needs the branch tensor")
        allowed &= (k_branch[:, None, :] == 0) | (k_branch[:, None, :] == q_branch[:, :, None])
    Lq, Lk = q_column.shape[1], k_column.shape[1]
    itself = torch.arange(Lk, device=q_column.device)[None, :] == (
        torch.arange(Lq, device=q_column.device)[:, None] + q_offset)
    return (allowed | itself).unsqueeze(1)


def columnar_mask(
    column: torch.Tensor,
    valid: torch.Tensor,
    branch: torch.Tensor | None = None,
    isolate_branches: bool = False,
) -> torch.Tensor:
    """Bool mask ``[B, 1, L, L]``, True = attend (DESIGN section 1)."""
    return columnar_mask_qk(column, valid, column, valid, branch, branch, isolate_branches)


def model_attention_mask(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """Convert a bool mask to what a transformers attention implementation takes as given.

    ``sdpa``: the bool mask itself. ``eager``: additive float, 0 where attended and
    ``finfo(dtype).min`` elsewhere (a bool mask there would be silently wrong; ``-inf`` would give
    NaN). paradec's :data:`~paradec.attention.COLUMNAR_SDPA` takes the same additive float: one
    copy that every layer and query chunk shares (sdpa converts a bool mask in every call, and
    the backward keeps each conversion). ``flex_attention`` needs a BlockMask built from the
    columns: see :func:`flex_block_mask`.
    """
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation in ("eager", COLUMNAR_SDPA):
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return out.masked_fill_(~mask, torch.finfo(dtype).min)
    if attn_implementation == "flex_attention":
        raise ValueError("flex_attention takes a BlockMask: build it with paradec.masks.flex_block_mask")
    raise ValueError(
        f"attention implementation {attn_implementation!r} cannot take a columnar mask; use one of "
        f"{SUPPORTED_ATTENTION} (flash_attention_2 treats repeated column positions as packed "
        "sequences and ignores custom masks)")


def flex_block_mask(column, valid, branch=None, isolate_branches=False, q_column=None, q_valid=None,
                    q_branch=None, q_offset: int = 0):
    """A FlexAttention ``BlockMask`` with the same rule as :func:`columnar_mask_qk`.

    Built from a ``mask_mod`` over the column / valid / branch vectors, so no dense ``[L, L]``
    tensor is ever created: this is the path for long layouts on CUDA.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    q_column = column if q_column is None else q_column
    q_valid = valid if q_valid is None else q_valid
    q_branch = branch if q_branch is None else q_branch
    if isolate_branches and branch is None:
        raise ValueError("isolate_branches=True needs the branch tensor")

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (column[b, kv_idx] < q_column[b, q_idx]) & q_valid[b, q_idx] & valid[b, kv_idx]
        if isolate_branches:
            kb = branch[b, kv_idx]
            allowed = allowed & ((kb == 0) | (kb == q_branch[b, q_idx]))
        return allowed | (kv_idx == q_idx + q_offset)

    B, Lq, Lk = column.shape[0], q_column.shape[1], column.shape[1]
    return create_block_mask(mask_mod, B, None, Lq, Lk, device=column.device)


def attention_implementation(model) -> str:
    """The attention implementation a model runs with (through DDP / FSDP / peft wrappers)."""
    from .rope import unwrap_model

    return getattr(unwrap_model(model).config, "_attn_implementation", None) or "eager"


def mask_for_model(model, column, valid, branch=None, isolate_branches=False, *, q_column=None,
                   q_valid=None, q_branch=None, q_offset: int = 0, dtype=None):
    """The columnar mask of queries vs keys, converted for ``model``'s attention implementation.

    Without ``q_*`` the queries are the keys (training / prefill). With them, ``column`` /
    ``valid`` / ``branch`` describe every key (cache + new) and ``q_*`` the new tokens.
    """
    impl = attention_implementation(model)
    if impl == "flex_attention":
        return flex_block_mask(column, valid, branch, isolate_branches, q_column, q_valid, q_branch,
                               q_offset)
    if q_column is None:
        mask = columnar_mask(column, valid, branch, isolate_branches)
    else:
        mask = columnar_mask_qk(q_column, q_valid, column, valid, q_branch, branch,
                                isolate_branches, q_offset)
    dtype = dtype or next(model.parameters()).dtype
    return model_attention_mask(mask, impl, dtype)


def layout_attention_mask(model, layout, isolate_branches: bool | None = None):
    """The 4D mask of a whole :class:`~paradec.layout.Layout` for ``model`` (training, prefill).

    ``isolate_branches`` defaults to the layout's own setting (from the collator config).
    """
    if isolate_branches is None:
        isolate_branches = layout.isolate_branches
    return mask_for_model(model, layout.column, layout.valid, layout.branch, isolate_branches)
