"""2D RoPE: the rotary replacement against a brute-force reading of the rule, and the patch.

Random models use initializer_range=0.2: at the default 0.02 attention is nearly uniform and a
wrong mask or RoPE moves logits by < 1e-2, so equality tests would pass on wrong code.
"""

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from paradec.layout import Branch, BranchSample, build_layout
from paradec.models import build_model, forward_layout
from paradec.rope import (
    ColumnarRotaryEmbedding,
    columnar_settings,
    is_patched,
    maybe_patch_from_config,
    patch_model,
    suggest_pair_indices,
)

SMALL = dict(name="test", arch="qwen3", vocab_size=97, hidden_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0,
             max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.2, pair_indices=[], branch_stride=128,
             attn_implementation="sdpa", dtype="float32", seed=0)


def small_model(**overrides):
    """A random 2-layer model (8 rotary pairs), patched, in eval mode."""
    model, _ = build_model({**SMALL, **overrides})
    return model.eval()


def unpatched_copy(model):
    """The same weights with the original transformers rotary module."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    del config.columnar
    fresh = AutoModelForCausalLM.from_config(config, attn_implementation=model.config._attn_implementation)
    fresh.load_state_dict(model.state_dict())
    assert not is_patched(fresh)
    return fresh.eval()


def brute_force_cos_sin(inv_freq, pos2d, pairs, scaling=1.0):
    """Pair by pair, as the rule reads: selected pairs use branch_pos, the others column."""
    B, L, _ = pos2d.shape
    n = inv_freq.shape[0]
    angle = torch.zeros(B, L, n, dtype=torch.float64)
    for k in range(1, n + 1):
        pos = pos2d[..., 0] if k in pairs else pos2d[..., 1]
        angle[..., k - 1] = pos.double() * inv_freq[k - 1].double()
    emb = torch.cat((angle, angle), -1)
    return emb.cos() * scaling, emb.sin() * scaling


# ----------------------------------------------------------------------------------------------
# The rotary module itself
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs", [[], [1], [2, 5, 8], list(range(1, 9))])
def test_rotary_matches_brute_force(pairs):
    model = small_model()
    rotary = model.model.rotary_emb
    rotary.set_pairs(pairs)
    pos2d = torch.stack((torch.randint(0, 5, (2, 7)) * 128, torch.randint(0, 300, (2, 7))), -1)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos2d)
    ref_cos, ref_sin = brute_force_cos_sin(rotary.inv_freq, pos2d, pairs)
    assert cos.shape == (2, 7, 16)
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-5, rtol=0)


def test_plain_positions_equal_original_module():
    """An ordinary [1, L] call is all columns with branch_pos 0: with pairs=[] exactly the original
    module; with pairs, the selected pairs stay unrotated (branch_pos 0) and the others match."""
    model = small_model(pair_indices=[])
    original = unpatched_copy(model).model.rotary_emb
    x = torch.zeros(1, dtype=torch.bfloat16)
    pos = torch.arange(40)[None]
    for a, b in zip(model.model.rotary_emb(x, pos), original(x, pos)):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    patch_model(model, [3, 4], 128)
    cos, _ = model.model.rotary_emb(x, pos)
    ref, _ = original(x, pos)
    branch_dims = torch.tensor([2, 3, 10, 11])
    other = torch.ones(16, dtype=torch.bool).index_fill_(0, branch_dims, False)
    assert (cos[..., branch_dims] == 1).all() and torch.equal(cos[..., other], ref[..., other])


def test_pair_one_is_highest_frequency():
    """Pair k is dims k-1 and k-1+n; pair 1 turns fastest."""
    model = small_model(pair_indices=[1])
    rotary = model.model.rotary_emb
    assert rotary.inv_freq[0] == rotary.inv_freq.max()
    pos2d = torch.tensor([[[128, 0]]])  # branch_pos 128, column 0
    cos, _ = rotary(torch.zeros(1), pos2d)
    moved = (cos[0, 0] != 1).nonzero().flatten().tolist()
    assert moved == [0, 8]


# ----------------------------------------------------------------------------------------------
# Patched model vs unpatched model
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("background", [[], [5, 6, 7, 8]])
def test_empty_pairs_single_branch_equals_unpatched(arch, attn, background):
    model = small_model(arch=arch, attn_implementation=attn)
    plain = unpatched_copy(model)
    layout = build_layout([BranchSample(background, [Branch([], [11, 12, 13, 14, 15, 16])])])
    assert torch.equal(layout.column[0], torch.arange(layout.column.shape[1]))
    with torch.no_grad():
        expected = plain(input_ids=layout.input_ids).logits
        got = forward_layout(model, layout).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        # Not vacuous: rotating some pairs by branch_pos (128) instead of the column changes logits.
        patch_model(model, [2, 7], 128)
        changed = forward_layout(model, layout).logits
    assert (changed - expected).abs().max() > 1e-2


def test_static_scaling_is_copied():
    """linear scaling changes inv_freq; the patch copies it (pairs=[] still equals unpatched)."""
    model = small_model()
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(unpatched_copy(model).config)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    plain = AutoModelForCausalLM.from_config(config).eval()
    patched = patch_model(copy.deepcopy(plain), [], 128)
    torch.testing.assert_close(patched.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    layout = build_layout([BranchSample([3, 4], [Branch([], [5, 6, 7])])])
    with torch.no_grad():
        torch.testing.assert_close(forward_layout(patched, layout).logits,
                                   plain(input_ids=layout.input_ids).logits, atol=1e-6, rtol=0)


def test_gpt_neox_partial_rotary():
    """GPT-NeoX rotates only part of each head: pairs are counted in inv_freq, not head_dim/2."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, initializer_range=0.2,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25})
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    n = plain.gpt_neox.rotary_emb.inv_freq.shape[0]
    assert n == 4  # head_dim 32 * 0.25 / 2
    with pytest.raises(ValueError, match=r"1\.\.4"):
        patch_model(copy.deepcopy(plain), [5], 128)
    patched = patch_model(copy.deepcopy(plain), [], 128)
    layout = build_layout([BranchSample([1, 2], [Branch([], [3, 4, 5])])])
    with torch.no_grad():
        torch.testing.assert_close(forward_layout(patched, layout).logits,
                                   plain(input_ids=layout.input_ids).logits, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Configuration errors, idempotence, settings
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [[0], [9], [-1], [2, 2], [1.5], [True]])
def test_bad_pair_indices_name_the_key(bad):
    model = small_model()
    with pytest.raises(ValueError, match="model.pair_indices") as err:
        patch_model(model, bad, 128)
    if bad in ([0], [9], [-1]):
        assert str(bad[0]) in str(err.value) and "1..8" in str(err.value)
    with pytest.raises(ValueError, match="model.pair_indices"):
        build_model({**SMALL, "pair_indices": [9]})


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}])
def test_dynamic_rope_refused(rope):
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(unpatched_copy(small_model()).config)
    config.rope_parameters = rope
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="dynamic"):
        patch_model(model, [1], 128)


def test_patch_is_idempotent_and_recorded():
    model = small_model(pair_indices=[1])
    patch_model(model, [4, 6], 64)
    rotary = model.model.rotary_emb
    assert isinstance(rotary, ColumnarRotaryEmbedding) and rotary.pair_indices == [4, 6]
    assert sum(isinstance(m, ColumnarRotaryEmbedding) for m in model.modules()) == 1
    assert columnar_settings(model) == {"pair_indices": [4, 6], "branch_stride": 64}
    assert model.config.to_dict()["columnar"] == {"pair_indices": [4, 6], "branch_stride": 64}
    model.config.columnar = {"pair_indices": [2], "branch_stride": 128}
    assert maybe_patch_from_config(model) and model.model.rotary_emb.pair_indices == [2]


def test_unpatched_model_refused_by_forward_layout():
    plain = unpatched_copy(small_model())
    with pytest.raises(ValueError, match="patch"):
        forward_layout(plain, build_layout([BranchSample([], [Branch([], [1, 2])])]))


def test_branch_stride_mismatch_refused():
    model = small_model(pair_indices=[3], branch_stride=128)
    layout = build_layout([BranchSample([], [Branch([], [1, 2])])], branch_stride=64)
    with pytest.raises(ValueError, match="collator.branch_stride"):
        forward_layout(model, layout)


def test_suggested_pairs_turn_enough_per_branch():
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))  # Qwen3: head_dim 128, theta 1e6
    pairs = suggest_pair_indices(inv_freq, branch_stride=128)
    assert pairs == [26, 27, 28, 29]
    angles = 128 * inv_freq
    assert all(angles[k - 1] >= 0.25 for k in pairs) and angles[29] < 0.25
    assert angles[-1] < 1e-3  # why not the very lowest pairs: branches would look alike
    assert math.isclose(float(angles[0]), 128.0)
