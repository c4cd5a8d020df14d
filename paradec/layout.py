"""The columnar layout: where every token of a sample sits, and what it is trained to predict.

Invariant (DESIGN section 1): a token is identified by (branch, column) alone. The background
(branch 0) fills columns ``t0 .. t0+N-1``; the prompt block starts at ``S = t0+N`` and is aligned
``left`` (every prompt starts at S) or ``right`` (every prompt ends at ``C-1``, ``C = S + max
prompt length``); every target starts at column ``C``. The label of a token is the next token of
its own branch, counted only where that next token is a target token (``loss_on="target"``) or any
real token (``loss_on="all"``). The linear order (interleaved = column-major, or branch-major) is
only storage: attention and positions depend on (branch, column) alone, so both orders compute the
same thing. Padding sits only at the end of a row.

This is the one layout builder: training, decoding, evaluation and benchmarks all call
:func:`build_layout`. It is vectorised over all tokens of the batch (numpy), with no per-token
Python loop.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

ALIGNMENTS = ("left", "right")
LOSS_ON = ("target", "all")
# The default gap between the branch coordinates of two branches (pos2d = branch * stride):
# wider than any prompt + answer, so rotated pairs of different branches never coincide.
BRANCH_STRIDE = 128
IGNORE_INDEX = -100
PAD_BRANCH = -1


@dataclass
class Branch:
    """One branch: a prompt (read) followed by a target (trained, and what the decoder writes)."""

    prompt: list[int]
    target: list[int]


@dataclass
class BranchSample:
    """A background shared by all branches, then K >= 1 branches. ``meta`` travels untouched."""

    background: list[int]
    branches: list[Branch]
    meta: dict = field(default_factory=dict)


@dataclass
class Layout:
    """A batch of samples laid out in columns; every tensor has one row per sample.

    Public fields (DESIGN section 4): ``input_ids``, ``column``, ``branch`` (0 background, 1..K,
    -1 padding), ``pos2d`` = (branch * branch_stride, column), ``valid``, ``labels`` (-100 = none).
    Extra fields used by the decoder and the training loop:
      ``is_target``  [B,L] bool: the token is a target token;
      ``num_branches`` [B] long: K of each sample;
      ``target_start`` [B] long: column C where every target of the sample starts;
      ``last_index`` [B,Kmax] long: row index of each branch's last token (-1 for k > K);
      ``meta``: the samples' ``meta`` dicts, in order;
      ``isolate_branches``: the attention rule this batch is meant for (set by the collator from
      its config, read by the one forward path, so no caller passes it separately).
    """

    input_ids: torch.Tensor
    column: torch.Tensor
    branch: torch.Tensor
    pos2d: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor
    is_target: torch.Tensor
    num_branches: torch.Tensor
    target_start: torch.Tensor
    last_index: torch.Tensor
    branch_stride: int = BRANCH_STRIDE
    meta: list = field(default_factory=list)
    isolate_branches: bool = False

    @property
    def num_target_tokens(self) -> int:
        """Tokens that carry a label (what the loss averages over)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> "Layout":
        """Move every tensor to ``device`` (non-tensor fields are shared)."""
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return Layout(**moved)


def _check_options(align_to: str, loss_on: str, branch_stride: int) -> None:
    if align_to not in ALIGNMENTS:
        raise ValueError(f"align_to must be one of {ALIGNMENTS}, got {align_to!r}")
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if branch_stride < 1:
        raise ValueError(f"branch_stride must be >= 1, got {branch_stride}")


def _segments(samples: Sequence[BranchSample]):
    """Per-segment lengths: segment 0 of a sample is its background, segment k its branch k."""
    seg_len, seg_prompt, seg_branch, seg_sample = [], [], [], []
    for s, sample in enumerate(samples):
        if not sample.branches:
            raise ValueError(f"sample {s} has no branches (a sample needs at least one)")
        n_bg = len(sample.background)
        # The background never "jumps" to the target block: treat all of it as prompt-like.
        seg_len.append(n_bg)
        seg_prompt.append(n_bg)
        seg_branch.append(0)
        seg_sample.append(s)
        for k, br in enumerate(sample.branches, start=1):
            n = len(br.prompt) + len(br.target)
            if n == 0:
                raise ValueError(f"sample {s}, branch {k} has no tokens (empty prompt and target)")
            seg_len.append(n)
            seg_prompt.append(len(br.prompt))
            seg_branch.append(k)
            seg_sample.append(s)
    return (np.asarray(seg_len, np.int64), np.asarray(seg_prompt, np.int64),
            np.asarray(seg_branch, np.int64), np.asarray(seg_sample, np.int64))


def build_layout(
    samples: Sequence[BranchSample],
    *,
    align_to: str = "left",
    interleave: bool = True,
    branch_stride: int = BRANCH_STRIDE,
    time_offsets: Sequence[int] | torch.Tensor | None = None,
    pad_to: int | None = None,
    pad_id: int = 0,
    loss_on: str = "target",
) -> Layout:
    """Lay out ``samples`` in columns (see the module docstring for the rules)."""
    _check_options(align_to, loss_on, branch_stride)
    if len(samples) == 0:
        raise ValueError("build_layout needs at least one sample")
    B = len(samples)
    seg_len, seg_prompt, seg_branch, seg_sample = _segments(samples)

    # Per-sample column anchors: t0, S = t0 + N, C = S + longest prompt.
    t0 = np.zeros(B, np.int64) if time_offsets is None else np.asarray(
        time_offsets.tolist() if isinstance(time_offsets, torch.Tensor) else time_offsets, np.int64)
    if t0.shape != (B,) or (t0 < 0).any():
        raise ValueError(f"time_offsets must be {B} non-negative integers, got {t0.tolist()}")
    is_bg_seg = seg_branch == 0
    n_bg = seg_len[is_bg_seg]
    max_prompt = np.zeros(B, np.int64)
    np.maximum.at(max_prompt, seg_sample[~is_bg_seg], seg_prompt[~is_bg_seg])
    S = t0 + n_bg
    C = S + max_prompt

    # Column of each segment's first token and the jump from the prompt end to column C.
    seg_start = np.where(is_bg_seg, t0[seg_sample],
                         S[seg_sample] if align_to == "left" else C[seg_sample] - seg_prompt)
    seg_jump = np.where(is_bg_seg, 0, C[seg_sample] - seg_start - seg_prompt)

    # Flat per-token arrays, in segment order (sample, then background, branch 1..K).
    pieces = itertools.chain.from_iterable(
        itertools.chain((s.background,), *((b.prompt, b.target) for b in s.branches))
        for s in samples)
    tokens = np.fromiter(
        itertools.chain.from_iterable(pieces),
        dtype=np.int64, count=int(seg_len.sum()))
    seg_id = np.repeat(np.arange(len(seg_len)), seg_len)
    seg_first = np.cumsum(seg_len) - seg_len
    j = np.arange(len(tokens)) - seg_first[seg_id]  # index of the token inside its segment
    in_target = (j >= seg_prompt[seg_id]) & ~is_bg_seg[seg_id]
    column = seg_start[seg_id] + j + in_target * seg_jump[seg_id]
    branch = seg_branch[seg_id]
    sample = seg_sample[seg_id]

    # Labels: the next token of the same segment, counted where that next token qualifies.
    has_next = j + 1 < seg_len[seg_id]
    next_tok = np.roll(tokens, -1)
    next_counts = np.roll(in_target, -1) if loss_on == "target" else np.ones_like(in_target)
    labels = np.where(has_next & next_counts, next_tok, IGNORE_INDEX)

    # Linear order inside a row: sort by (column, branch) or (branch, column). Both put the
    # background first, since its columns precede every branch column.
    width = int(column.max()) + 1
    max_k = int(seg_branch.max()) + 1
    key = column * max_k + branch if interleave else branch * width + column
    order = np.lexsort((key, sample))
    row_len = np.bincount(sample, minlength=B)
    L = int(row_len.max())
    if pad_to is not None:
        too_long = np.nonzero(row_len > pad_to)[0]
        if len(too_long):
            s = int(too_long[0])
            raise ValueError(f"sample {s} has {int(row_len[s])} tokens, longer than pad_to={pad_to}")
        L = pad_to
    row_first = np.cumsum(row_len) - row_len
    sorted_sample = sample[order]
    pos = np.arange(len(order)) - row_first[sorted_sample]
    flat = sorted_sample * L + pos  # destination cell in the [B, L] grid

    def grid(values: np.ndarray, fill, dtype=np.int64) -> torch.Tensor:
        out = np.full(B * L, fill, dtype)
        out[flat] = values[order]
        return torch.from_numpy(out.reshape(B, L))

    branch_t = grid(branch, PAD_BRANCH)
    column_t = grid(column, 0)
    # Row index of each branch's last token (the decoder reads its logits there).
    last_in_seg = (j == seg_len[seg_id] - 1) & (branch > 0)
    last_index = np.full((B, max_k - 1), -1, np.int64)
    where_last = np.empty(len(order), np.int64)
    where_last[order] = pos
    last_index[sample[last_in_seg], branch[last_in_seg] - 1] = where_last[last_in_seg]

    return Layout(
        input_ids=grid(tokens, pad_id),
        column=column_t,
        branch=branch_t,
        pos2d=torch.stack((branch_t.clamp(min=0) * branch_stride, column_t), dim=-1),
        valid=branch_t >= 0,
        labels=grid(labels, IGNORE_INDEX),
        is_target=grid(in_target, False, bool),
        num_branches=torch.from_numpy(np.bincount(seg_sample, minlength=B) - 1),
        target_start=torch.from_numpy(C),
        last_index=torch.from_numpy(last_index),
        branch_stride=branch_stride,
        meta=[s.meta for s in samples],
    )
