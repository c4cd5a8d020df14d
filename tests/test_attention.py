"""paradec's columnar sdpa against transformers' own sdpa (and eager), and the work it skips.

The reference is transformers' ``sdpa_attention_forward`` on the same tensors: equal outputs and
gradients for training layouts (interleaved and branch-major, isolated or not, padded rows, GQA
and MHA), prefills and column steps against a cache; then the two savings are checked by
counting what reaches the kernel.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from paradec import attention
from paradec.attention import COLUMNAR_SDPA, attention_plan, causal_rows, columnar_sdpa_forward
from paradec.layout import Branch, BranchSample, build_layout
from paradec.masks import columnar_mask, columnar_mask_qk, model_attention_mask
from paradec.models import forward_layout
from tests.tiny import tiny_model

CHUNK = 32  # small chunks, so short layouts already span several of them


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", CHUNK)


class Heads(torch.nn.Module):
    """The attributes transformers' attention function reads from its module."""

    def __init__(self, heads, kv_heads):
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True


def layout(seed=0, interleave=True, samples=2, background=(10, 40), answer=(20, 60)):
    rng = random.Random(seed)
    batch = [BranchSample([rng.randrange(2, 50) for _ in range(rng.randint(*background))],
                          [Branch([rng.randrange(2, 50) for _ in range(rng.randint(0, 4))],
                                  [rng.randrange(2, 50) for _ in range(rng.randint(*answer))])
                           for _ in range(rng.randint(2, 4))]) for _ in range(samples)]
    return build_layout(batch, interleave=interleave)


def qkv(B, L, heads, kv_heads, S=None, d=16, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    S = L if S is None else S
    make = lambda h, n: torch.randn(B, n, h, d, generator=gen).transpose(1, 2)  # noqa: E731  HF's layout
    q, k, v = make(heads, L), make(kv_heads, S), make(kv_heads, S)
    return [t.detach().requires_grad_(grad) for t in (q, k, v)]


def reference(mask, q, k, v, heads, kv_heads):
    return sdpa_attention_forward(Heads(heads, kv_heads), q, k, v, mask, scaling=0.25)[0]


def ours(mask, q, k, v, heads, kv_heads):
    return columnar_sdpa_forward(Heads(heads, kv_heads), q, k, v, mask, scaling=0.25)[0]


def test_the_plan_matches_a_brute_force_reading():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 70, 90, generator=gen) < 0.05
    mask[0, 0, :, 0] = True  # no chunk is empty
    plan = attention_plan(mask, 16)
    assert plan.causal == 0  # not square
    for (a, b, end), start in zip(plan.chunks, range(0, 70, 16), strict=True):
        seen = mask[:, 0, a:b].any(0).any(0).nonzero().flatten()
        assert (a, b, end) == (start, min(start + 16, 70), int(seen.max()) + 1)
    additive = model_attention_mask(mask, COLUMNAR_SDPA, torch.float32)
    assert attention_plan(additive, 16) == plan


def brute_force_causal_rows(mask):
    n = 0
    for i in range(mask.shape[-1]):
        want = torch.arange(mask.shape[-1]) <= i
        if not all(torch.equal(mask[b, 0, i], want) for b in range(mask.shape[0])):
            break
        n += 1
    return n


def test_the_context_rows_are_found_causal():
    lay = layout(seed=4, interleave=True)
    mask = columnar_mask(lay.column, lay.valid, lay.branch)
    shortest = min(int((lay.branch[b] == 0).sum()) for b in range(lay.branch.shape[0]))
    # the shortest context, and the first token after it (which sees just that context)
    assert causal_rows(mask) == brute_force_causal_rows(mask) == shortest + 1
    square = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    assert causal_rows(square) == 6
    square[0, 0, 3, 1] = False  # row 3 misses a key: rows 0-2 only
    assert causal_rows(square) == brute_force_causal_rows(square) == 3
    square[0, 0, 3, 1], square[0, 0, 1, 4] = True, True  # row 1 sees a later key
    assert causal_rows(square) == brute_force_causal_rows(square) == 1


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 2)])
def test_training_forward_and_backward_equal_transformers_sdpa(interleave, isolate, heads,
                                                               kv_heads):
    lay = layout(seed=heads + kv_heads, interleave=interleave)
    B, L = lay.input_ids.shape
    assert L > 3 * CHUNK and not lay.valid.all()  # several chunks, padded rows
    bool_mask = columnar_mask(lay.column, lay.valid, lay.branch, isolate)
    outs, grads = [], []
    for fn, mask in ((reference, bool_mask),
                     (ours, model_attention_mask(bool_mask, COLUMNAR_SDPA, torch.float32)),
                     (ours, bool_mask)):
        q, k, v = qkv(B, L, heads, kv_heads, grad=True)
        out = fn(mask, q, k, v, heads, kv_heads)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    for out, grad in zip(outs[1:], grads[1:]):
        assert out.shape == outs[0].shape == (B, L, heads, 16)
        assert torch.allclose(out, outs[0], atol=1e-5, rtol=1e-4)
        for g, g_ref in zip(grad, grads[0]):
            assert torch.allclose(g, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3), (4, 4)])
def test_a_column_step_against_a_cache_equals_transformers_sdpa(heads, kv_heads):
    lay = layout(seed=5)
    B, S = lay.input_ids.shape
    K = int(lay.last_index.shape[1])
    q_column = lay.target_start[:, None].expand(B, K)
    q_valid = lay.last_index >= 0
    q_branch = torch.arange(1, K + 1).expand(B, K).masked_fill(~q_valid, -1)
    k_column = torch.cat((lay.column, q_column), 1)
    k_valid = torch.cat((lay.valid, q_valid), 1)
    k_branch = torch.cat((lay.branch, q_branch), 1)
    mask = columnar_mask_qk(q_column, q_valid, k_column, k_valid, q_branch, k_branch,
                            q_offset=S)
    with torch.no_grad():
        q, k, v = qkv(B, K, heads, kv_heads, S=S + K)
        expected = reference(mask, q, k, v, heads, kv_heads)
        got = ours(model_attention_mask(mask, COLUMNAR_SDPA, torch.float32), q, k, v, heads,
                   kv_heads)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_no_mask_and_2d_masks_go_to_transformers_sdpa_unchanged():
    q, k, v = qkv(2, 9, 4, 2)
    with torch.no_grad():
        assert torch.equal(ours(None, q, k, v, 4, 2), reference(None, q, k, v, 4, 2))
        padded = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
        padded[1, :, :, :3] = False
        padded[1, :, range(9), range(9)] = True
        assert torch.allclose(ours(padded, q, k, v, 4, 2), reference(padded, q, k, v, 4, 2),
                              atol=1e-6)


def record_kernel_calls(monkeypatch):
    calls = []
    kernel = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    return calls


def test_keys_no_query_of_a_chunk_attends_are_never_computed(monkeypatch):
    """An interleaved layout attends no key after itself: the chunks together see about half
    of the square, as is_causal attention does; branch-major order saves less, still exactly."""
    calls = record_kernel_calls(monkeypatch)
    lay = layout(seed=1, samples=1, background=(60, 60), answer=(60, 60))
    L = lay.input_ids.shape[1]
    mask = model_attention_mask(columnar_mask(lay.column, lay.valid), COLUMNAR_SDPA,
                                torch.float32)
    q, k, v = qkv(1, L, 4, 2)
    with torch.no_grad():
        ours(mask, q, k, v, 4, 2)
    context = 60 + 1  # the background, and its first branch token (which sees the same keys)
    assert calls[0] == ((1, 4, context, 16), (1, 2, context, 16))  # one is_causal call
    rows = sum(qs[2] for qs, _ in calls[1:]) // 2  # 2 query heads of a group per call
    assert rows == L - context
    pairs = sum(qs[2] * ks[2] for qs, ks in calls[1:]) // 2
    assert pairs < 0.6 * (L * L - context * context)
    assert all(ks[1] == 2 for _, ks in calls)  # the two KV heads, never repeated


def test_a_step_attends_grouped_heads_without_copying_the_cache(monkeypatch):
    calls = record_kernel_calls(monkeypatch)
    q, k, v = qkv(1, 3, 9, 3, S=200)
    mask = torch.zeros(1, 1, 3, 200)
    with torch.no_grad():
        out = ours(mask, q, k, v, 9, 3)
    assert calls == [((1, 3, 9, 16), (1, 3, 200, 16))]  # the 3 query heads of a group as rows
    assert out.shape == (1, 3, 9, 16)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_a_patched_model_runs_columnar_sdpa_and_computes_what_eager_computes(arch):
    model = tiny_model(arch=arch, pair_indices=[7, 8])
    assert model.config._attn_implementation == COLUMNAR_SDPA
    assert tiny_model(attn="eager").config._attn_implementation == "eager"
    lay = layout(seed=2)
    with torch.no_grad():
        got = forward_layout(model, lay).logits
        model.set_attn_implementation("eager")
        expected = forward_layout(model, lay).logits
    real = lay.valid
    assert torch.allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_saving_a_patched_model_does_not_record_the_columnar_kernel(tmp_path):
    model = tiny_model(pair_indices=[7])
    model.save_pretrained(tmp_path)
    assert COLUMNAR_SDPA not in (tmp_path / "config.json").read_text()


def test_a_new_mask_is_planned_anew_even_at_the_same_address():
    """The plan is kept for the one mask tensor every layer of a forward gets; a changed or a
    later mask (a new batch, in the freed memory of the last) is planned anew."""
    memory = torch.empty(100 * 100, dtype=torch.bool).untyped_storage()

    def mask(blocked_row):  # every mask in the same memory, made by the same in-place steps
        out = torch.empty(0, dtype=torch.bool).set_(memory, 0, (1, 1, 100, 100))
        out.fill_(True).tril_()
        out[0, 0, blocked_row, 5] = False  # rows from here on are not causal
        return out

    causal = mask(90)
    first = attention_plan(causal, 32)
    assert first.causal == 90 and attention_plan(causal, 32) is first  # kept for the layers
    causal[0, 0, 50, 10] = False  # the same tensor changed in place: a new version
    assert attention_plan(causal, 32).causal == 50
    for row in (70, 60, 80):  # new masks at the same address, of the same shape and version
        address = causal.data_ptr()
        del causal
        causal = mask(row)
        assert causal.data_ptr() == address
        assert attention_plan(causal, 32).causal == row
