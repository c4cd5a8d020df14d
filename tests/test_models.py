"""Models on layouts: storage order, KV cache, bf16, save/load, peft, tokenizer, presets, MoE."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from paradec.layout import Branch, BranchSample, build_layout
from paradec.loss import columnar_loss, load_balancing_loss
from paradec.masks import mask_for_model
from paradec.models import (
    apply_columnar,
    build_model,
    cache_kwargs,
    count_parameters,
    forward_layout,
    load_model,
    load_preset,
    load_pretrained,
    save_model,
    train_tokenizer,
)
from paradec.rope import columnar_settings, is_patched
from tests.test_rope import SMALL, small_model


def random_samples(seed=0, n_samples=2, vocab=97):
    """Samples with a background, 2-4 branches of different prompt / target lengths."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    samples = []
    for s in range(n_samples):
        branches = [Branch(toks(int(torch.randint(0, 4, (1,), generator=g))),
                           toks(int(torch.randint(1, 6, (1,), generator=g))))
                    for _ in range(2 + s % 3)]
        samples.append(BranchSample(toks(3 + 2 * s), branches))
    return samples


def by_token(layout, logits):
    """{(sample, branch, column): logits row} over real tokens."""
    out = {}
    for b, i in layout.valid.nonzero().tolist():
        out[(b, int(layout.branch[b, i]), int(layout.column[b, i]))] = logits[b, i]
    return out


# ----------------------------------------------------------------------------------------------
# Storage order, loss, KV cache
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("align_to", ["left", "right"])
@pytest.mark.parametrize("isolate", [False, True])
def test_interleaved_equals_branch_major(attn, align_to, isolate):
    model = small_model(pair_indices=[2, 6], attn_implementation=attn)
    samples = random_samples()
    inter = build_layout(samples, align_to=align_to, interleave=True)
    major = build_layout(samples, align_to=align_to, interleave=False)
    assert not torch.equal(inter.input_ids, major.input_ids)  # the orders really differ
    with torch.no_grad():
        li = forward_layout(model, inter, isolate_branches=isolate).logits
        lm = forward_layout(model, major, isolate_branches=isolate).logits
    ti, tm = by_token(inter, li), by_token(major, lm)
    assert ti.keys() == tm.keys()
    worst = max(float((ti[k] - tm[k]).abs().max()) for k in ti)
    assert worst <= 1e-5
    (loss_i, n_i), (loss_m, n_m) = columnar_loss(li, inter.labels), columnar_loss(lm, major.labels)
    assert int(n_i) == int(n_m) > 0
    assert abs(float(loss_i) - float(loss_m)) <= 1e-5


def test_columnar_loss_is_unshifted_cross_entropy():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[3, -100, 4, -100, -100], [-100, -100, -100, -100, 10]])
    loss, n = columnar_loss(logits, labels)
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    assert int(n) == 3 and torch.allclose(loss, expected)
    total, _ = columnar_loss(logits, labels, reduction="sum")
    assert torch.allclose(total, expected * 3)
    empty, n0 = columnar_loss(logits, torch.full((2, 5), -100))
    assert int(n0) == 0 and float(empty) == 0.0  # no NaN on a batch without labels


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("isolate", [False, True])
@pytest.mark.parametrize("reserve", [None, 0, 64])
def test_column_at_a_time_with_cache_equals_full_forward(attn, isolate, reserve):
    """Prefill background + prompts, then one forward per column (all branches' tokens), on
    transformers' DynamicCache (reserve None) and on the decoders' reserved cache, growing from
    the prefill (0) or never (64)."""
    from transformers import DynamicCache

    from paradec.kv_cache import reserved_cache

    model = small_model(pair_indices=[2, 6], attn_implementation=attn)
    sample = BranchSample([5, 6, 7, 8], [Branch([9, 10], [11, 12, 13]), Branch([14], [15, 16, 17, 18]),
                                        Branch([19, 20, 21], [22])])
    lay = build_layout([sample], align_to="right", interleave=True)
    with torch.no_grad():
        full = forward_layout(model, lay, isolate_branches=isolate).logits
        col = lay.column[0]
        start = int((col < lay.target_start[0]).sum())  # interleaved: prompts end before column C
        cache = (DynamicCache(config=model.config) if reserve is None
                 else reserved_cache(model, reserve))
        pieces = []
        bounds = [start] + [int((col <= c).sum()) for c in range(int(lay.target_start[0]), int(col.max()) + 1)]
        prefill_mask = mask_for_model(model, lay.column[:, :start], lay.valid[:, :start],
                                      lay.branch[:, :start], isolate)
        out = model(input_ids=lay.input_ids[:, :start], position_ids=lay.pos2d[:, :start],
                    attention_mask=prefill_mask, **cache_kwargs(model, cache), use_cache=True)
        pieces.append(out.logits)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            assert (col[lo:hi] == col[lo]).all()  # one column per step
            mask = mask_for_model(model, lay.column[:, :hi], lay.valid[:, :hi], lay.branch[:, :hi],
                                  isolate, q_column=lay.column[:, lo:hi], q_valid=lay.valid[:, lo:hi],
                                  q_branch=lay.branch[:, lo:hi], q_offset=lo)
            out = model(input_ids=lay.input_ids[:, lo:hi], position_ids=lay.pos2d[:, lo:hi],
                        attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
            pieces.append(out.logits)
    stepped = torch.cat(pieces, dim=1)
    assert stepped.shape == full.shape
    assert (stepped - full).abs().max() <= 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bf16_padded_rows_have_no_nan(attn, weights):
    model = small_model(pair_indices=[2, 6], attn_implementation=attn, dtype=weights)
    lay = build_layout(random_samples(seed=1, n_samples=3), pad_to=40)
    assert (~lay.valid).any()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = forward_layout(model, lay).logits
    assert torch.isfinite(logits).all()
    loss, _ = columnar_loss(logits, lay.labels)
    assert torch.isfinite(loss)


def test_training_step_gradients_are_finite():
    model = small_model(pair_indices=[2, 6]).train()
    lay = build_layout(random_samples(seed=2), pad_to=32)
    loss, _ = columnar_loss(forward_layout(model, lay).logits, lay.labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# Saving, loading, peft
# ----------------------------------------------------------------------------------------------

def test_save_load_reapplies_patch(tmp_path):
    tok = train_tokenizer(["the cat sat on the mat. the dog ran."] * 20, vocab_size=280)
    model, tok = build_model({**SMALL, "pair_indices": [3, 5]}, tokenizer=tok)
    model.eval()
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    lay = build_layout(random_samples(seed=3, vocab=len(tok)))
    with torch.no_grad():
        before = forward_layout(model, lay).logits
    save_model(model, tok, tmp_path / "ckpt")
    loaded, loaded_tok = load_pretrained(tmp_path / "ckpt")
    assert is_patched(loaded) and loaded.model.rotary_emb.pair_indices == [3, 5]
    assert loaded_tok is not None and len(loaded_tok) == len(tok)
    with torch.no_grad():
        after = forward_layout(loaded.eval(), lay).logits
    assert torch.equal(before, after)
    # Loading through a config with model.path: the same settings pass, different ones are refused.
    again, _ = load_model({**SMALL, "pair_indices": [3, 5], "path": str(tmp_path / "ckpt")})
    assert columnar_settings(again) == {"pair_indices": [3, 5], "branch_stride": 128}
    with pytest.raises(ValueError, match="model.pair_indices"):
        load_model({**SMALL, "pair_indices": [1], "path": str(tmp_path / "ckpt")})


def test_peft_lora_keeps_columnar_rotary(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = small_model(pair_indices=[2, 6])
    lay = build_layout(random_samples(seed=4))
    with torch.no_grad():
        expected = forward_layout(model, lay).logits
    base = copy.deepcopy(model)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert is_patched(lora) and columnar_settings(lora)["pair_indices"] == [2, 6]
    with torch.no_grad():
        got = forward_layout(lora, lay).logits  # LoRA B = 0 at init: same function
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with torch.no_grad():  # not vacuous: the same LoRA model with the pairs unrotated differs
        apply_columnar(lora, [2, 6], 128)  # same settings: accepted
        from paradec.rope import patch_model
        patch_model(lora, [], 128)
        assert (forward_layout(lora, lay).logits - expected).abs().max() > 1e-2
        patch_model(lora, [2, 6], 128)
    lora.save_pretrained(str(tmp_path / "adapter"))
    save_model(base, None, tmp_path / "base")
    reloaded_base, _ = load_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(reloaded_base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_layout(reloaded, lay).logits, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Tokenizer, presets, MoE
# ----------------------------------------------------------------------------------------------

def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    texts = ["Columnar decoding writes several answers at once.", "Ünïcode and emoji 🚀 survive."] * 30
    tok = train_tokenizer(texts, vocab_size=320, save_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == len(tok) <= 320
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>" and loaded.bos_token == "<|bos|>"
    for text in texts[:2] + ["never seen: ∑ 42"]:  # byte-level: no unknown tokens, exact decode
        ids = loaded(text)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert loaded.decode(ids) == text
    assert loaded.convert_tokens_to_ids("<|endoftext|>") == loaded.eos_token_id


@pytest.mark.parametrize("name,lo,hi", [("tiny", 0.5e6, 3e6), ("small", 5e6, 7e6), ("minimind2_small", 26e6 * 0.8, 26e6 * 1.2),
                                        ("minimind2", 104e6 * 0.8, 104e6 * 1.2),
                                        ("minimind2_moe", 80e6, 160e6)])
def test_preset_parameter_counts(name, lo, hi):
    cfg = load_preset(name)
    model, tok = build_model(cfg)
    assert tok is None and lo <= count_parameters(model) <= hi
    assert columnar_settings(model) == {"pair_indices": list(cfg.pair_indices),
                                        "branch_stride": cfg.branch_stride}
    from paradec.rope import suggest_pair_indices
    assert suggest_pair_indices(model, cfg.branch_stride) == list(cfg.pair_indices)


@pytest.mark.parametrize("init", [None, 0.02])
def test_a_preset_initialises_its_weights_with_its_initializer_range(init):
    # The default pipeline's quality depends on model=tiny's initializer_range (docs/results.md),
    # so the key must reach transformers' init, and an override must win over the preset.
    cfg = load_preset("tiny")
    cfg.seed = 0
    if init is not None:
        cfg.initializer_range = init
    model, _ = build_model(cfg)
    expected = cfg.initializer_range
    for weight in (model.model.layers[0].self_attn.q_proj.weight,
                   model.model.layers[-1].mlp.down_proj.weight, model.model.embed_tokens.weight):
        assert abs(weight.std().item() / expected - 1) < 0.05, (weight.shape, weight.std())


@pytest.mark.parametrize("name", ["qwen3_0_6b", "qwen3_4b"])
def test_hub_presets_are_complete(name):
    cfg = load_preset(name)
    assert cfg.arch == "hub" and cfg.hub_id.startswith("Qwen/")
    # Qwen3: head_dim 128 -> 64 pairs; four distinct low-frequency pairs of them
    assert len(set(cfg.pair_indices)) == 4 and all(1 <= k <= 64 for k in cfg.pair_indices)


def test_unknown_preset_and_bad_attention():
    with pytest.raises(ValueError, match="known presets"):
        load_preset("nope")
    with pytest.raises(ValueError, match="model.attn_implementation"):
        build_model({**SMALL, "attn_implementation": "flash_attention_2"})


def test_moe_forward_with_aux_loss():
    model, _ = build_model({**SMALL, "arch": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                                  "router_aux_loss_coef": 0.01,
                            "moe_intermediate_size": 64, "pair_indices": [2]})
    lay = build_layout(random_samples(seed=5), pad_to=32)
    out = forward_layout(model.train(), lay)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert 1.0 <= float(out.aux_loss.detach()) <= 4.0  # top_k = 2 when balanced, num_experts at worst
    (columnar_loss(out.logits, lay.labels)[0] + 0.01 * out.aux_loss).backward()
    with torch.no_grad():
        assert forward_layout(model.eval(), lay).get("aux_loss") is None


def test_load_balancing_loss_ignores_padding():
    logits = [torch.randn(6, 4)]
    valid = torch.tensor([[True, True, True, False, False, False]])
    masked = load_balancing_loss(logits, 4, 2, valid)
    alone = load_balancing_loss([logits[0][:3]], 4, 2, None)
    torch.testing.assert_close(masked, alone)


def test_forward_without_a_cache_passes_no_past_key_values(recwarn):
    """Training calls forward_layout without a cache: no deprecated ``past_key_values`` kwarg
    reaches the model (newer transformers 5.x would warn on every step)."""
    model, _ = build_model({**SMALL, "pair_indices": [2]})
    forward_layout(model.train(), build_layout(random_samples(seed=2)))
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_the_cache_goes_under_the_name_the_models_forward_declares(recwarn):
    """transformers renamed ``past_key_values`` to ``cache`` within 5.x (the old name warns, then
    goes away): paradec passes whichever name the model's forward declares, through peft too."""
    import inspect

    from paradec.config import DecodeConfig, LoraSettings
    from paradec.decoding import decode_columnar
    from paradec.models import add_lora

    class OlderApi(torch.nn.Module):  # earlier 5.x releases and remote-code models
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return None

    assert cache_kwargs(OlderApi(), "c") == {"past_key_values": "c"}
    assert cache_kwargs(OlderApi(), None) == {}
    model, _ = build_model({**SMALL, "pair_indices": [2]})
    declared = inspect.signature(type(model).forward).parameters
    name = "cache" if "cache" in declared else "past_key_values"
    assert cache_kwargs(model, "c") == {name: "c"}
    samples = [BranchSample(s.background, [Branch(b.prompt, []) for b in s.branches])
               for s in random_samples(seed=4)]
    decode_columnar(model.eval(), samples, eos_token_id=None, cfg=DecodeConfig(max_new_tokens=3))
    lora = add_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0), "unused-base-path")
    assert cache_kwargs(lora, "c") == {name: "c"}
    decode_columnar(lora.eval(), samples, eos_token_id=None, cfg=DecodeConfig(max_new_tokens=3))
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
