"""The collator: grouping, seeded random choices, config validation, one config group."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from paradec.collator import ColumnarCollator
from paradec.config import CollatorConfig
from paradec.layout import Branch, BranchSample, build_layout

CONF = Path(__file__).resolve().parents[1] / "conf"


def chunks(n, length=5):
    return [list(range(100 * i, 100 * i + length)) for i in range(n)]


def test_groups_loose_branches_into_samples():
    collate = ColumnarCollator(branches_per_sample=3)
    lay = collate(chunks(7))
    assert lay.num_branches.tolist() == [3, 3, 1]  # the remainder forms a smaller sample
    # each chunk is an all-target branch with no background
    assert not (lay.branch == 0).any()
    expected = build_layout([BranchSample([], [Branch([], c) for c in chunks(7)[:3]])])
    assert torch.equal(lay.input_ids[0], expected.input_ids[0])


def test_accepts_dicts_and_ready_samples_in_a_dataloader():
    ready = BranchSample([1, 2], [Branch([3], [4, 5])], meta={"ids": ["q1"]})
    items = [{"input_ids": c} for c in chunks(2)] + [ready]
    loader = DataLoader(items, batch_size=3, collate_fn=ColumnarCollator(branches_per_sample=2))
    (lay,) = list(loader)
    assert lay.num_branches.tolist() == [2, 1]
    assert lay.meta[1] == {"ids": ["q1"]}


def test_random_branch_counts_are_seeded_and_in_range():
    def counts(seed):
        collate = ColumnarCollator(min_branches_per_sample=2, max_branches_per_sample=5, seed=seed)
        return collate(chunks(200)).num_branches.tolist()

    a, b, c = counts(1), counts(1), counts(2)
    assert a == b and a != c
    assert set(a[:-1]) == {2, 3, 4, 5}  # the last sample holds the remainder


def test_time_offsets_and_state_dict_resume():
    collate = ColumnarCollator(random_time_offset=6, branches_per_sample=1, seed=3)
    first = collate(chunks(16))
    assert set(first.column[:, 0].tolist()) <= set(range(7)) and first.column[:, 0].max() > 0
    state = collate.state_dict()
    after = collate(chunks(16))
    collate.load_state_dict(state)
    assert torch.equal(collate(chunks(16)).column, after.column)


def test_collator_settings_reach_the_layout():
    sample = BranchSample([1, 2, 3], [Branch([4, 5], [6]), Branch([7], [8, 9])])
    lay = ColumnarCollator(align_to="right", interleave_branches=False, branch_stride=7,
                           loss_on="all", pad_to=20, isolate_branches=True, pad_id=5)([sample])
    ref = build_layout([sample], align_to="right", interleave=False, branch_stride=7,
                       loss_on="all", pad_to=20, pad_id=5)
    for name in ("input_ids", "column", "branch", "pos2d", "labels", "valid"):
        assert torch.equal(getattr(lay, name), getattr(ref, name)), name
    assert lay.isolate_branches and not ref.isolate_branches


@pytest.mark.parametrize("key, value, match", [
    ("branches_per_sample", 0, "collator.branches_per_sample"),
    ("align_to", "middle", "collator.align_to"),
    ("loss_on", "prompt", "collator.loss_on"),
    ("random_time_offset", -1, "collator.random_time_offset"),
    ("branch_stride", 0, "collator.branch_stride"),
    ("min_branches_per_sample", 3, "max_branches_per_sample"),
])
def test_bad_values_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        CollatorConfig(**{key: value}).validate()


def test_min_above_max_rejected():
    with pytest.raises(ValueError, match="min <= max"):
        CollatorConfig(min_branches_per_sample=5, max_branches_per_sample=2).validate()


def test_the_collator_group_only_ties_the_stride_to_the_model():
    """CollatorConfig holds every default; the group file adds only the stride's link to the
    model preset (one source for both)."""
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "collator" / "default.yaml"))
    assert yaml == {"branch_stride": "${model.branch_stride}"}


def test_random_counts_subsample_ready_samples_with_their_meta():
    sample = BranchSample([1, 2], [Branch([10 + k], [20 + k]) for k in range(4)],
                          meta={"ids": ["a", "b", "c", "d"], "context_id": "x"})
    collate = ColumnarCollator(min_branches_per_sample=1, max_branches_per_sample=4, seed=0)
    counts = set()
    for _ in range(40):
        (kept,) = collate.group([sample])
        counts.add(len(kept.branches))
        assert kept.meta["context_id"] == "x" and kept.background == [1, 2]
        # the kept ids are those of the kept branches, in order
        assert [f"{'abcd'[b.prompt[0] - 10]}" for b in kept.branches] == kept.meta["ids"]
    assert counts == {1, 2, 3, 4}
    assert ColumnarCollator().group([sample])[0] is sample  # fixed counts: untouched


def test_question_weighting_gives_every_count_the_same_share_of_questions():
    """count_weighting=question: P(k) ~ 1/k, so k=1 samples train as many questions as k=4 ones."""
    sample = BranchSample([1], [Branch([10 + k], [20 + k]) for k in range(4)])

    def questions_per_count(weighting):
        collate = ColumnarCollator(min_branches_per_sample=1, max_branches_per_sample=4,
                                   count_weighting=weighting, seed=0)
        totals = {k: 0 for k in range(1, 5)}
        for _ in range(4000):
            k = len(collate.group([sample])[0].branches)
            totals[k] += k
        return {k: n / sum(totals.values()) for k, n in totals.items()}

    balanced, per_sample = questions_per_count("question"), questions_per_count("sample")
    assert all(abs(share - 0.25) < 0.03 for share in balanced.values()), balanced
    assert abs(per_sample[1] - 0.1) < 0.02 and abs(per_sample[4] - 0.4) < 0.03, per_sample


def test_bad_count_weighting_names_the_key():
    with pytest.raises(ValueError, match="collator.count_weighting"):
        CollatorConfig(count_weighting="token").validate()
