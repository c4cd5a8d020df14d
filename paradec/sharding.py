"""Evaluation on several processes: each process answers whole contexts, balanced by tokens.

Invariant: :func:`context_shards` gives every sample to exactly one process, and every sample of
a context to the same process (a context with more questions than
``collator.branches_per_sample`` spans several samples sharing ``meta["context_id"]``; splitting
it would change what its parallel decode sees). It is a pure function of the samples, so every
process computes the same partition without talking to the others. :func:`merge_shards` puts
the answers gathered from all processes back in the one-process order (that of
:func:`paradec.evaluation.questions_of`) and fails if a sample was answered twice or not at all.
"""

from __future__ import annotations

from typing import Sequence

from .layout import BranchSample


def contexts(samples: Sequence[BranchSample]) -> list[list[int]]:
    """The sample indices of each context, in order of first appearance (a sample without a
    ``context_id`` is a context of its own)."""
    groups: dict = {}
    for i, sample in enumerate(samples):
        key = sample.meta.get("context_id", ("sample", i))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def sample_tokens(sample: BranchSample, new_tokens: int) -> int:
    """What a sample costs to answer: its background, its questions and their answer budget."""
    return len(sample.background) + sum(len(b.prompt) + new_tokens for b in sample.branches)


def context_shards(samples: Sequence[BranchSample], num_shards: int,
                   new_tokens: int) -> list[list[int]]:
    """Sample indices per shard (ascending), whole contexts only, balanced by tokens.

    Largest context first, each to the shard with the fewest tokens so far (ties: the lowest
    shard), so no shard exceeds the average by more than its largest context.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    groups = contexts(samples)
    cost = [sum(sample_tokens(samples[i], new_tokens) for i in group) for group in groups]
    load = [0] * num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for g in sorted(range(len(groups)), key=lambda g: (-cost[g], g)):
        target = min(range(num_shards), key=lambda s: (load[s], s))
        load[target] += cost[g]
        shards[target] += groups[g]
    return [sorted(shard) for shard in shards]


def split_by_sample(samples: Sequence[BranchSample], answers: list) -> list[list]:
    """A flat list of answers (one per question, in sample order) cut into one list per sample."""
    out, start = [], 0
    for sample in samples:
        out.append(answers[start:start + len(sample.branches)])
        start += len(sample.branches)
    if start != len(answers):
        raise ValueError(f"{len(answers)} answers for {start} questions")
    return out


def merge_shards(num_samples: int, shards: Sequence[tuple[list[int], list[list]]]) -> list:
    """``(sample indices, answers per sample)`` of every shard -> the flat answers of all samples,
    in sample order. Every sample must be answered by exactly one shard."""
    by_sample: dict[int, list] = {}
    for indices, per_sample in shards:
        for index, answers in zip(indices, per_sample, strict=True):
            if index in by_sample:
                raise ValueError(f"sample {index} was answered by two processes")
            by_sample[index] = answers
    missing = sorted(set(range(num_samples)) - by_sample.keys())
    if missing or len(by_sample) != num_samples:
        raise ValueError(f"samples {missing[:10]} were answered by no process")
    return [answer for index in range(num_samples) for answer in by_sample[index]]
