"""The columnar decoder: one forward for the prefill, then one forward per column for all branches.

Invariant (DESIGN section 1): the prefill lays out background + every prompt of every sample with
:func:`paradec.layout.build_layout` (the same builder and alignment as training, targets empty)
into one KV cache, each background stored once. The logits at each branch's last prompt token give
its first target token, which sits at column ``C``; each later step feeds one token per
still-active branch at the next column (and, once, the EOS of a branch that just finished, since
training lets the other branches see it), all samples in one forward, with a mask row that sees
every cached real token plus itself (:func:`paradec.masks.columnar_mask_qk`, the same rule as
training). So T new tokens cost exactly ``1 + (T - 1)`` forwards, however many branches there are.

The loop is vectorised over samples and branches: per step it makes one host sync (how many
branches are still active, which both ends the loop and sizes the next input).

Also here: :func:`decode_plain`, the unpatched-model baselines (``baseline``: one question at a
time; ``batched``: all questions of a context as one left-padded batch with the context copied
into every row), both through ``generate``, as users of a normal causal LM would decode; and
:func:`decode_prefix` (``prefix``): the rows' common prefix prefilled once and its KV cache shared
by every row, what prefix caching in a serving system gives.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from .config import DecodeConfig
from .kv_cache import reserved_cache
from .layout import BRANCH_STRIDE, Branch, BranchSample, build_layout
from .masks import mask_for_model
from .models import cache_kwargs, forward_layout
from .rope import unwrap_model

# Called after each new column / token: (t, tokens [B, K], emitted [B, K]); t = 0 right after
# the prefill, so a caller can time the prefill and the steps apart, or stream answers.
OnStep = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class DecodeResult:
    """Generated token ids per sample and branch (cut after EOS, EOS included), and the costs."""

    tokens: list[list[list[int]]]
    forward_calls: int = 0
    new_tokens: int = 0
    peak_kv_tokens: int = 0
    wall_s: float = 0.0
    steps: list = field(default_factory=list)

    def merge(self, other: "DecodeResult") -> None:
        self.tokens += other.tokens
        self.forward_calls += other.forward_calls
        self.new_tokens += other.new_tokens
        self.peak_kv_tokens = max(self.peak_kv_tokens, other.peak_kv_tokens)
        self.wall_s += other.wall_s


def choose_tokens(logits: torch.Tensor, cfg: DecodeConfig, generator: torch.Generator | None):
    """Greedy, or temperature / top-k / top-p sampling, over the last dimension."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = scores.topk(min(cfg.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_scores, idx = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) > cfg.top_p  # keep the smallest set reaching top_p
        scores = scores.scatter(-1, idx, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1).reshape(-1, scores.shape[-1])
    picked = torch.multinomial(probs, 1, generator=generator)
    return picked.reshape(scores.shape[:-1])


def _generator(cfg: DecodeConfig, device) -> torch.Generator | None:
    if cfg.temperature <= 0:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


def prompts_only(samples: Sequence[BranchSample]) -> list[BranchSample]:
    """The samples with their targets removed: what the decoder prefills."""
    return [BranchSample(s.background, [Branch(b.prompt, []) for b in s.branches], s.meta)
            for s in samples]


def _cut(tokens: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor) -> list:
    """[B, K, T] tensor -> nested lists, each branch cut to its length, each sample to its K."""
    rows, lens = tokens.tolist(), lengths.tolist()
    return [[rows[b][k][:lens[b][k]] for k in range(int(c))] for b, c in enumerate(counts.tolist())]


def step_inputs(model, cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                q_column: torch.Tensor, q_valid: torch.Tensor, q_branch: torch.Tensor, *,
                branch_stride: int, isolate_branches: bool = False):
    """The inputs of one column step besides its tokens: ``(cached, attention_mask, pos2d)``.

    ``cached`` is ``(column, valid, branch)`` of every token in the KV cache ``[B, S]``, and is
    returned with the step's tokens appended; ``q_*`` ``[B, n]`` describe the fed tokens (branch
    1-based, -1 = a padding slot). The mask lets each fed token see every cached real token of its
    row that the columnar rule allows, plus itself (:func:`paradec.masks.mask_for_model`).
    """
    k_column, k_valid, k_branch = cached
    past = k_column.shape[1]
    cached = (torch.cat((k_column, q_column), 1), torch.cat((k_valid, q_valid), 1),
              torch.cat((k_branch, q_branch), 1))
    mask = mask_for_model(model, *cached, isolate_branches, q_column=q_column, q_valid=q_valid,
                          q_branch=q_branch, q_offset=past)
    pos2d = torch.stack((q_branch.clamp(min=0) * branch_stride, q_column), -1)
    return cached, mask, pos2d


@torch.no_grad()
def decode_columnar(model, samples: Sequence[BranchSample], *, eos_token_id: int | None,
                    pad_token_id: int = 0, align_to: str = "left", branch_stride: int = BRANCH_STRIDE,
                    isolate_branches: bool = False, cfg: DecodeConfig,
                    on_step: OnStep | None = None,
                    keep_logits: bool = False) -> DecodeResult:
    """Decode every branch of every sample in parallel (see the module docstring).

    ``samples`` may carry targets (they are ignored). ``on_step(t, tokens [B, Kmax], emitted
    [B, Kmax])`` is called after each new column, e.g. to stream answers to a terminal.
    ``keep_logits`` records, per forward, ``(which branches it predicted for [B, Kmax], logits
    [B, Kmax, V])`` in ``result.steps`` (for tests and analysis).
    """
    cfg = cfg.validate()
    start = time.perf_counter()
    device = next(model.parameters()).device
    layout = build_layout(prompts_only(samples), align_to=align_to, interleave=True,
                          branch_stride=branch_stride, pad_id=pad_token_id).to(device)
    layout.isolate_branches = isolate_branches
    B, K = layout.last_index.shape
    # every row holds its prompt and, per step, at most one token of each branch
    cache = reserved_cache(model, layout.input_ids.shape[1] + K * (cfg.max_new_tokens - 1))
    # 1. Prefill: logits only where each branch's last prompt token sits.
    logits = forward_layout(model, layout, past_key_values=cache, use_cache=True,
                            logits_to_keep=layout.last_index.clamp(min=0)).logits
    forward_calls = 1
    generator = _generator(cfg, device)
    token = choose_tokens(logits, cfg, generator)  # [B, K]: every branch's first target token
    active = layout.last_index >= 0
    steps = [(active.clone(), logits)] if keep_logits else []
    cached = (layout.column, layout.valid, layout.branch)
    out = torch.full((B, K, cfg.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    slots = torch.arange(K, device=device).expand(B, K)
    for t in range(cfg.max_new_tokens):
        emitted = active  # the branches that wrote a token at column C + t
        out[:, :, t] = torch.where(emitted, token, pad_token_id)
        lengths += emitted
        if on_step is not None:
            on_step(t, token, emitted)
        if eos_token_id is not None and not cfg.ignore_eos:
            active = emitted & (token != eos_token_id)
        if t == cfg.max_new_tokens - 1:
            break
        # The step's one host sync: how wide the next input is, and whether anyone still writes.
        n, still = torch.stack((emitted.sum(1).max(), active.sum())).tolist()
        if still == 0:
            break
        # 2. One forward for the next column. Every token emitted at column C + t is fed, an EOS
        # too: in training the other branches attend to a finished branch's EOS, so they must
        # here as well (its own prediction is unused). Each row's fed branches come first.
        order = torch.argsort((~emitted).to(torch.int8), dim=1, stable=True)[:, :n]
        q_valid = emitted.gather(1, order)
        q_token = token.gather(1, order).masked_fill(~q_valid, pad_token_id)
        q_branch = (slots.gather(1, order) + 1).masked_fill(~q_valid, -1)
        q_column = (layout.target_start[:, None] + t).expand(B, n)
        cached, mask, pos2d = step_inputs(model, cached, q_column, q_valid, q_branch,
                                          branch_stride=branch_stride,
                                          isolate_branches=isolate_branches)
        step_logits = model(input_ids=q_token, position_ids=pos2d, attention_mask=mask,
                            **cache_kwargs(model, cache), use_cache=True).logits
        forward_calls += 1
        token = token.scatter(1, order, choose_tokens(step_logits, cfg, generator))
        if keep_logits:
            full = step_logits.new_zeros(B, K, step_logits.shape[-1])
            full.scatter_(1, order[..., None].expand_as(step_logits), step_logits)
            steps.append((active.clone(), full))
    kv_tokens = B * cached[0].shape[1]
    return DecodeResult(tokens=_cut(out, lengths, layout.num_branches),
                        forward_calls=forward_calls, new_tokens=int(lengths.sum()),
                        peak_kv_tokens=kv_tokens, wall_s=time.perf_counter() - start,
                        steps=steps)


@contextmanager
def count_forwards(model):
    """Count the causal LM's forward calls inside the block (for ``generate`` baselines). The
    hook sits on the transformers model itself: a peft wrapper's ``generate`` calls that one's
    forward, never its own."""
    calls = [0]
    handle = unwrap_model(model).register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


class _StepStreamer(BaseStreamer):
    """``generate``'s streamer as an ``on_step(t, tokens [B, 1], emitted [B, 1])`` callback:
    ``generate`` first puts the prompt, then each new token of every row."""

    def __init__(self, on_step: OnStep):
        self.on_step, self.t = on_step, -1

    def put(self, value: torch.Tensor) -> None:
        if self.t >= 0:
            tokens = value.reshape(-1, 1)
            self.on_step(self.t, tokens, torch.ones_like(tokens, dtype=torch.bool))
        self.t += 1

    def end(self) -> None:
        pass


@torch.no_grad()
def decode_plain(model, rows: Sequence[list[int]], *, eos_token_id: int | None, pad_token_id: int,
                 cfg: DecodeConfig, on_step: OnStep | None = None) -> DecodeResult:
    """Plain causal decoding of ``rows`` (token lists) as one left-padded batch via ``generate``.

    With the columnar rotary module, plain ``[B, L]`` positions mean "column = index, branch 0",
    which is exactly the unpatched model: this is the baseline a user of the model has today.
    Returns one "sample" per row with one branch each. ``on_step`` as in
    :func:`decode_columnar` (through ``generate``'s streamer; rows that finished are still fed).
    """
    cfg = cfg.validate()
    start = time.perf_counter()
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # per row, not per token: builds the padded batch
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attn[i, width - len(r):] = 1
    ids, attn = ids.to(device), attn.to(device)
    sample_kwargs = {"do_sample": False}
    if cfg.temperature > 0:
        torch.manual_seed(cfg.seed)
        sample_kwargs = {"do_sample": True, "temperature": cfg.temperature,
                         "top_k": cfg.top_k or None, "top_p": cfg.top_p}
    stop = None if cfg.ignore_eos else eos_token_id
    cache = reserved_cache(model, width + cfg.max_new_tokens)
    with count_forwards(model) as calls:
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.max_new_tokens if cfg.ignore_eos else None,
                             eos_token_id=stop, pad_token_id=pad_token_id,
                             streamer=_StepStreamer(on_step) if on_step else None,
                             **cache_kwargs(model, cache),
                             **sample_kwargs)
    new = gen[:, width:]
    if stop is not None:  # cut after the first EOS (generate pads finished rows)
        is_eos = new == stop
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
    else:
        first = torch.full((new.shape[0],), new.shape[1], device=new.device)
    tokens = [[row[:n]] for row, n in zip(new.tolist(), first.tolist())]
    return DecodeResult(tokens=tokens, forward_calls=calls[0], new_tokens=int(first.sum()),
                        peak_kv_tokens=gen.shape[0] * (gen.shape[1] - 1),
                        wall_s=time.perf_counter() - start)


def common_prefix_length(rows: Sequence[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    shortest = min(len(r) for r in rows)
    heads = torch.tensor([r[:shortest] for r in rows], dtype=torch.long)
    same = (heads == heads[:1]).all(0)
    return min(int(same.long().cumprod(0).sum()), shortest - 1)


@torch.no_grad()
def decode_prefix(model, rows: Sequence[list[int]], *, eos_token_id: int | None,
                  pad_token_id: int, cfg: DecodeConfig,
                  on_step: OnStep | None = None) -> DecodeResult:
    """Prefix caching on the unpatched model: the rows' common prefix (the context) is prefilled
    once into a KV cache (:mod:`paradec.kv_cache`) that every row then shares (expanded to the
    rows), the rest of each row (its question) is prefilled as one right-padded batch, then all
    rows decode in one forward per new token.

    Positions and the 2D attention mask make each row compute what it computes alone: it sees
    the prefix, its own suffix (never the padding) and its own new tokens, at positions
    ``len(row) + t``; so greedy answers equal :func:`decode_plain`'s one row at a time. A step
    makes one host sync (whether any row still writes). ``on_step`` as in
    :func:`decode_columnar` (tokens and emitted ``[rows, 1]``).
    """
    cfg = cfg.validate()
    start = time.perf_counter()
    device = next(model.parameters()).device
    n_rows = len(rows)
    common = common_prefix_length(rows)
    cache = reserved_cache(model, max(len(r) for r in rows) + cfg.max_new_tokens)
    forward_calls = 0
    if common:
        prefix = torch.tensor([rows[0][:common]], dtype=torch.long, device=device)
        model(input_ids=prefix, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        forward_calls += 1
        cache.batch_repeat_interleave(n_rows)
    lengths_in = torch.tensor([len(r) - common for r in rows], device=device)
    width = int(lengths_in.max())
    ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):  # per row, not per token: builds the padded batch
        ids[i, :len(row) - common] = torch.tensor(row[common:], dtype=torch.long)
    ids = ids.to(device)
    steps = torch.arange(width, device=device)
    mask = torch.cat((torch.ones(n_rows, common, dtype=torch.long, device=device),
                      (steps < lengths_in[:, None]).long()), 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(common + steps).expand(
        n_rows, width), **cache_kwargs(model, cache), use_cache=True).logits
    forward_calls += 1
    generator = _generator(cfg, device)
    token = choose_tokens(logits[torch.arange(n_rows, device=device), lengths_in - 1], cfg,
                          generator)
    out = torch.full((n_rows, cfg.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    written = torch.zeros(n_rows, dtype=torch.long, device=device)
    active = torch.ones(n_rows, dtype=torch.bool, device=device)
    position = common + lengths_in  # where each row's first new token sits
    for t in range(cfg.max_new_tokens):
        emitted = active
        out[:, t] = torch.where(emitted, token, pad_token_id)
        written += emitted
        if on_step is not None:
            on_step(t, token[:, None], emitted[:, None])
        if eos_token_id is not None and not cfg.ignore_eos:
            active = emitted & (token != eos_token_id)
        if t == cfg.max_new_tokens - 1 or not bool(active.any()):
            break
        mask = torch.cat((mask, torch.ones(n_rows, 1, dtype=torch.long, device=device)), 1)
        step = model(input_ids=token[:, None], attention_mask=mask,
                     position_ids=(position + t)[:, None], **cache_kwargs(model, cache),
                     use_cache=True).logits[:, -1]
        forward_calls += 1
        token = choose_tokens(step, cfg, generator)
    tokens = [[row[:n]] for row, n in zip(out.tolist(), written.tolist())]
    return DecodeResult(tokens=tokens, forward_calls=forward_calls, new_tokens=int(written.sum()),
                        peak_kv_tokens=n_rows * mask.shape[1],
                        wall_s=time.perf_counter() - start)
