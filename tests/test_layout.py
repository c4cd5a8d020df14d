"""build_layout: the worked example of DESIGN section 1, a brute-force oracle, and bad inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradec.layout import Branch, BranchSample, build_layout

# --- the worked example -------------------------------------------------------------------------

EXAMPLE = BranchSample(
    background=[1, 2, 3],  # b0 b1 b2
    branches=[Branch(prompt=[10, 11], target=[12, 13]),  # p10 p11 | t10 t11
              Branch(prompt=[20], target=[21, 22, 23])])  # p20 | t20 t21 t22


def cells(layout, row=0):
    """{(branch, column): (token, label, is_target)} for the real tokens of one row."""
    out = {}
    for i in range(layout.input_ids.shape[1]):
        if layout.valid[row, i]:
            key = (int(layout.branch[row, i]), int(layout.column[row, i]))
            assert key not in out, f"two tokens share {key}"
            out[key] = (int(layout.input_ids[row, i]), int(layout.labels[row, i]),
                        bool(layout.is_target[row, i]))
    return out


@pytest.mark.parametrize("interleave", [True, False])
def test_worked_example_right(interleave):
    lay = build_layout([EXAMPLE], align_to="right", interleave=interleave)
    assert cells(lay) == {
        (0, 0): (1, -100, False), (0, 1): (2, -100, False), (0, 2): (3, -100, False),
        (1, 3): (10, -100, False), (1, 4): (11, 12, False), (1, 5): (12, 13, True),
        (1, 6): (13, -100, True),
        (2, 4): (20, 21, False), (2, 5): (21, 22, True), (2, 6): (22, 23, True),
        (2, 7): (23, -100, True),
    }
    assert lay.target_start.tolist() == [5]
    assert lay.pos2d[0, :, 0].tolist() == (lay.branch[0] * 128).tolist()
    assert torch.equal(lay.pos2d[0, :, 1], lay.column[0])


def test_worked_example_left_moves_p20_only():
    lay = build_layout([EXAMPLE], align_to="left")
    got = cells(lay)
    assert got[(2, 3)] == (20, 21, False)  # p20 moves to column 3 ...
    assert (2, 4) not in got  # ... and column 4 of branch 2 stays empty
    assert got[(2, 5)] == (21, 22, True)  # targets still start at column 5
    assert got[(1, 5)] == (12, 13, True)


def test_interleaved_linear_order_is_column_major():
    lay = build_layout([EXAMPLE], align_to="right", interleave=True)
    # background, then column by column with branch 1..K inside a column
    assert lay.input_ids[0].tolist() == [1, 2, 3, 10, 11, 20, 12, 21, 13, 22, 23]
    lay = build_layout([EXAMPLE], align_to="right", interleave=False)
    assert lay.input_ids[0].tolist() == [1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]


def test_loss_on_all_trains_prompts_and_background_but_not_across_the_fork():
    lay = build_layout([EXAMPLE], align_to="right", loss_on="all")
    got = cells(lay)
    assert got[(0, 0)][1] == 2 and got[(0, 1)][1] == 3
    assert got[(0, 2)][1] == -100  # the last background token predicts nothing: branches fork
    assert got[(1, 3)][1] == 11
    assert got[(2, 7)][1] == -100  # the last target token predicts nothing


def test_time_offsets_shift_every_column():
    base = build_layout([EXAMPLE, EXAMPLE], align_to="right")
    shifted = build_layout([EXAMPLE, EXAMPLE], align_to="right", time_offsets=[0, 7])
    assert torch.equal(shifted.column[0], base.column[0])
    assert torch.equal(shifted.column[1], base.column[1] + 7)
    assert shifted.target_start.tolist() == [5, 12]


def test_padding_only_at_row_ends_and_pad_to():
    short = BranchSample([5], [Branch([6], [7])])
    lay = build_layout([EXAMPLE, short], pad_to=16, pad_id=99)
    assert lay.input_ids.shape == (2, 16)
    assert lay.valid[1].tolist() == [True] * 3 + [False] * 13
    assert (lay.input_ids[1, 3:] == 99).all() and (lay.labels[1, 3:] == -100).all()
    assert (lay.branch[1, 3:] == -1).all()
    assert lay.last_index.tolist() == [[8, 10], [2, -1]]  # t11 and t22 (left, interleaved)
    assert lay.num_branches.tolist() == [2, 1]


def test_prompt_only_branches_for_prefill():
    """The decoder lays out prompts with empty targets; the last prompt token is last_index."""
    sample = BranchSample([1, 2, 3], [Branch([10, 11], []), Branch([20], [])])
    lay = build_layout([sample], align_to="right")
    assert lay.target_start.tolist() == [5]
    assert (lay.labels == -100).all()
    for k, idx in enumerate(lay.last_index[0].tolist(), start=1):
        assert lay.branch[0, idx] == k and lay.column[0, idx] == 4  # ends at C-1 = 4


# --- bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="align_to"):
        build_layout([EXAMPLE], align_to="middle")
    with pytest.raises(ValueError, match="loss_on"):
        build_layout([EXAMPLE], loss_on="prompt")
    with pytest.raises(ValueError, match=r"sample 0 has 11 tokens, longer than pad_to=8"):
        build_layout([EXAMPLE], pad_to=8)
    with pytest.raises(ValueError, match=r"sample 1, branch 2 has no tokens"):
        build_layout([EXAMPLE, BranchSample([1], [Branch([2], [3]), Branch([], [])])])
    with pytest.raises(ValueError, match="no branches"):
        build_layout([BranchSample([1, 2], [])])
    with pytest.raises(ValueError, match="time_offsets"):
        build_layout([EXAMPLE], time_offsets=[-1])


# --- brute-force oracle on random samples --------------------------------------------------------

def oracle(sample, align_to, loss_on, t0=0):
    """The rules of DESIGN section 1 written as plainly as possible, token by token."""
    n = len(sample.background)
    S = t0 + n
    C = S + max(len(b.prompt) for b in sample.branches)
    toks = [(0, t0 + i, tok, False) for i, tok in enumerate(sample.background)]
    for k, br in enumerate(sample.branches, start=1):
        start = S if align_to == "left" else C - len(br.prompt)
        toks += [(k, start + i, tok, False) for i, tok in enumerate(br.prompt)]
        toks += [(k, C + i, tok, True) for i, tok in enumerate(br.target)]
    out = {}
    for k in range(len(sample.branches) + 1):
        mine = sorted((t for t in toks if t[0] == k), key=lambda t: t[1])
        for cur, nxt in zip(mine, mine[1:] + [None]):
            counts = nxt is not None and (nxt[3] if loss_on == "target" else True)
            out[(cur[0], cur[1])] = (cur[2], nxt[2] if counts else -100, cur[3])
    return out


token_lists = st.lists(st.integers(1, 500), min_size=0, max_size=6)
branches = st.builds(Branch, prompt=token_lists, target=token_lists).filter(
    lambda b: b.prompt or b.target)
samples = st.builds(BranchSample, background=token_lists,
                    branches=st.lists(branches, min_size=1, max_size=5))


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(samples, min_size=1, max_size=4), align_to=st.sampled_from(["left", "right"]),
       loss_on=st.sampled_from(["target", "all"]), interleave=st.booleans(),
       offsets=st.lists(st.integers(0, 9), min_size=4, max_size=4), stride=st.integers(1, 300))
def test_matches_oracle(batch, align_to, loss_on, interleave, offsets, stride):
    offsets = offsets[: len(batch)]
    lay = build_layout(batch, align_to=align_to, loss_on=loss_on, interleave=interleave,
                       time_offsets=offsets, branch_stride=stride)
    for row, sample in enumerate(batch):
        assert cells(lay, row) == oracle(sample, align_to, loss_on, offsets[row])
        real = lay.valid[row]
        # padding only at the end of the row, and nothing on it
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()
        assert (lay.labels[row, n_real:] == -100).all()
        # pos2d = (branch * stride, column) on real tokens
        assert torch.equal(lay.pos2d[row, :n_real, 0], lay.branch[row, :n_real] * stride)
        assert torch.equal(lay.pos2d[row, :n_real, 1], lay.column[row, :n_real])
        # linear order: sorted by (column, branch) or (branch, column)
        keys = list(zip(lay.column[row, :n_real].tolist(), lay.branch[row, :n_real].tolist()))
        if not interleave:
            keys = [(b, c) for c, b in keys]
        assert keys == sorted(keys)
        # last_index points at each branch's last token
        for k in range(1, len(sample.branches) + 1):
            idx = int(lay.last_index[row, k - 1])
            assert lay.branch[row, idx] == k
            assert lay.column[row, idx] == lay.column[row][lay.branch[row] == k].max()
