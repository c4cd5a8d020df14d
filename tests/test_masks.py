"""columnar_mask against a brute-force reading of the rule, plus the per-implementation conversion."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradec.layout import Branch, BranchSample, build_layout
from paradec.masks import columnar_mask, columnar_mask_qk, model_attention_mask
from tests.test_layout import EXAMPLE, samples


def brute_force_mask(column, valid, branch, isolate):
    B, L = column.shape
    out = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                ok = bool(valid[b, i] and valid[b, j] and column[b, j] < column[b, i])
                if isolate:
                    ok = ok and int(branch[b, j]) in (0, int(branch[b, i]))
                out[b, 0, i, j] = ok or i == j
    return out


def test_worked_example_cells():
    lay = build_layout([EXAMPLE], align_to="right")
    m = columnar_mask(lay.column, lay.valid, lay.branch)[0, 0]
    idx = {(int(b), int(c)): i for i, (b, c) in enumerate(zip(lay.branch[0], lay.column[0]))}
    t20 = idx[(2, 5)]
    assert m[t20, idx[(0, 2)]] and m[t20, idx[(1, 4)]] and m[t20, idx[(2, 4)]]
    assert not m[t20, idx[(1, 5)]]  # never another token of its own column
    assert not m[t20, idx[(2, 6)]]  # never the future
    assert m[t20, t20]
    iso = columnar_mask(lay.column, lay.valid, lay.branch, isolate_branches=True)[0, 0]
    assert not iso[t20, idx[(1, 4)]] and iso[t20, idx[(2, 4)]] and iso[t20, idx[(0, 0)]]


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(samples, min_size=1, max_size=3), align_to=st.sampled_from(["left", "right"]),
       interleave=st.booleans(), isolate=st.booleans())
def test_matches_brute_force(batch, align_to, interleave, isolate):
    lay = build_layout(batch, align_to=align_to, interleave=interleave, pad_to=None)
    got = columnar_mask(lay.column, lay.valid, lay.branch, isolate_branches=isolate)
    assert got.dtype == torch.bool and got.shape == (len(batch), 1) + lay.column.shape[1:] * 2
    assert torch.equal(got, brute_force_mask(lay.column, lay.valid, lay.branch, isolate))


def test_padding_rows_see_only_themselves():
    lay = build_layout([EXAMPLE, BranchSample([1], [Branch([2], [3])])])
    m = columnar_mask(lay.column, lay.valid)
    pad = (~lay.valid[1]).nonzero().flatten()
    for i in pad.tolist():
        assert m[1, 0, i].nonzero().flatten().tolist() == [i]
    assert m.any(-1).all()  # no fully masked row anywhere


def test_cached_rows_equal_full_mask_rows():
    """The decoder's query-vs-cache mask is the same rule: rows of the full mask."""
    lay = build_layout([EXAMPLE, BranchSample([1, 2], [Branch([4], [5, 6]), Branch([], [7])])],
                       align_to="right")
    full = columnar_mask(lay.column, lay.valid, lay.branch, True)
    past = 5
    part = columnar_mask_qk(lay.column[:, past:], lay.valid[:, past:], lay.column, lay.valid,
                            lay.branch[:, past:], lay.branch, True, q_offset=past)
    assert torch.equal(part, full[:, :, past:])


def test_conversion_per_implementation():
    lay = build_layout([EXAMPLE, BranchSample([1], [Branch([2], [3])])])
    m = columnar_mask(lay.column, lay.valid)
    assert model_attention_mask(m, "sdpa", torch.float32) is m
    for dtype in (torch.float32, torch.bfloat16):
        add = model_attention_mask(m, "eager", dtype)
        assert add.dtype == dtype and add.shape == m.shape  # one mask for all heads
        assert (add[m] == 0).all() and (add[~m] == torch.finfo(dtype).min).all()
        assert not torch.isinf(add).any()
    with pytest.raises(ValueError, match="flash_attention_2"):
        model_attention_mask(m, "flash_attention_2", torch.float32)
