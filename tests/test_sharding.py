"""Sharding an evaluation over processes: whole contexts, balanced by tokens, each sample once,
and the answers put back in the one-process order (the two-process runs: test_multiprocess.py)."""

import random

import pytest

from paradec.layout import Branch, BranchSample
from paradec.sharding import context_shards, contexts, merge_shards, sample_tokens, split_by_sample


def make_samples(seed=0, n_contexts=13):
    """Contexts of random length with 1-7 questions, 3 per sample at most: a context with more
    spans consecutive samples sharing its context_id, as the data tasks make them."""
    rng = random.Random(seed)
    out = []
    for c in range(n_contexts):
        background = [1] * rng.randint(5, 200)
        questions = [Branch([2] * rng.randint(1, 9), [3]) for _ in range(rng.randint(1, 7))]
        for i in range(0, len(questions), 3):
            out.append(BranchSample(background, questions[i:i + 3], {"context_id": f"c{c}"}))
    return out


@pytest.mark.parametrize("num_shards", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sample_once_and_a_context_never_split(num_shards, seed):
    samples = make_samples(seed)
    shards = context_shards(samples, num_shards, new_tokens=16)
    assert len(shards) == num_shards
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(len(samples)))  # each sample exactly once
    owner = {i: s for s, shard in enumerate(shards) for i in shard}
    for group in contexts(samples):
        assert len({owner[i] for i in group}) == 1, group  # a context stays on one process
    assert all(shard == sorted(shard) for shard in shards)
    assert context_shards(samples, num_shards, 16) == shards  # the same on every process


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shards_are_balanced_by_tokens(seed):
    samples = make_samples(seed, n_contexts=40)
    groups = contexts(samples)
    cost = [sum(sample_tokens(samples[i], 16) for i in g) for g in groups]
    for n in (2, 3, 4):
        loads = [sum(sample_tokens(samples[i], 16) for i in shard)
                 for shard in context_shards(samples, n, 16)]
        # Greedy largest-first: no shard exceeds the mean by more than one context.
        assert max(loads) <= sum(cost) / n + max(cost)
        # ... and it is much better than that bound on many contexts.
        assert max(loads) - min(loads) <= max(cost)
    # Balanced by tokens, not by count: one huge context against many small ones.
    big = BranchSample([1] * 1000, [Branch([2], [3])], {"context_id": "big"})
    small = [BranchSample([1] * 10, [Branch([2], [3])], {"context_id": f"s{i}"})
             for i in range(10)]
    assert context_shards([big, *small], 2, 0) == [[0], list(range(1, 11))]


def test_samples_without_a_context_id_are_contexts_of_their_own():
    samples = [BranchSample([1], [Branch([2], [3])]) for _ in range(4)]
    assert contexts(samples) == [[0], [1], [2], [3]]
    # A context's samples need not be adjacent to stay together.
    tagged = [BranchSample([1], [Branch([2], [3])], {"context_id": c}) for c in "abab"]
    assert contexts(tagged) == [[0, 2], [1, 3]]


def test_more_processes_than_contexts_leaves_some_idle():
    samples = make_samples(0, n_contexts=2)
    shards = context_shards(samples, 5, 16)
    assert sum(1 for shard in shards if shard) == 2


def test_merge_puts_answers_back_in_sample_order():
    samples = make_samples(1)
    answers = [f"{s}-{k}" for s, sample in enumerate(samples) for k in range(len(sample.branches))]
    per_sample = split_by_sample(samples, answers)
    shards = context_shards(samples, 3, 16)
    gathered = [(shard, [per_sample[i] for i in shard]) for shard in reversed(shards)]
    assert merge_shards(len(samples), gathered) == answers


def test_merge_refuses_a_sample_answered_twice_or_never():
    per_sample = [["a"], ["b"], ["c"]]
    with pytest.raises(ValueError, match="sample 1 was answered by two processes"):
        merge_shards(3, [([0, 1], per_sample[:2]), ([1, 2], per_sample[1:])])
    with pytest.raises(ValueError, match=r"samples \[2\] were answered by no process"):
        merge_shards(3, [([0, 1], per_sample[:2])])
    with pytest.raises(ValueError, match="3 answers for 2 questions"):
        split_by_sample([BranchSample([1], [Branch([2], [3])] * 2)], ["a", "b", "c"])
    with pytest.raises(ValueError, match="num_shards"):
        context_shards([], 0, 16)
