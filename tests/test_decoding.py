"""The columnar decoder: cached steps equal full recomputes, isolation equals lone decoding,
forward counts, the plain baselines, and a LoRA-wrapped model through the same path."""

import random

import pytest
import torch

from paradec.config import DecodeConfig
from paradec.decoding import (
    common_prefix_length,
    decode_columnar,
    decode_plain,
    decode_prefix,
    prompts_only,
)
from paradec.layout import Branch, BranchSample, build_layout
from paradec.models import forward_layout
from tests.tiny import tiny_model

EOS = 1
PAD = 0


def random_samples(n, seed=0, prompt_lens=None, vocab=61):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 4)
        lens = prompt_lens or [rng.randint(1, 5) for _ in range(k)]
        out.append(BranchSample(
            background=[rng.randrange(2, vocab) for _ in range(rng.randint(0, 7))],
            branches=[Branch([rng.randrange(2, vocab) for _ in range(p)], []) for p in lens]))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("align_to", ["left", "right"])
def test_each_step_equals_a_full_recompute(attn, align_to):
    model = tiny_model(attn=attn, pair_indices=[7, 8])
    samples = random_samples(3, seed=1)
    res = decode_columnar(model, samples, eos_token_id=EOS, align_to=align_to,
                          cfg=DecodeConfig(max_new_tokens=6), keep_logits=True)
    for t, (predicted, logits) in enumerate(res.steps):
        # the layout with every branch's tokens emitted before this forward as its target
        full_samples = [BranchSample(s.background, [
            Branch(b.prompt, res.tokens[i][k][:t]) for k, b in enumerate(s.branches)])  # EOS included
            for i, s in enumerate(samples)]
        lay = build_layout(full_samples, align_to=align_to)
        with torch.no_grad():
            ref = forward_layout(model, lay).logits
        for b, k in predicted.nonzero().tolist():
            idx = int(lay.last_index[b, k])
            diff = (ref[b, idx] - logits[b, k]).abs().max()
            assert diff <= 1e-4, (t, b, k, float(diff))
    assert len(res.steps) > 2  # the comparison ran over several columns


def test_forward_calls_are_one_per_column_whatever_the_branch_count():
    model = tiny_model()
    for n_branches in (1, 3, 8):
        sample = BranchSample([5, 6, 7], [Branch([8 + k], []) for k in range(n_branches)])
        res = decode_columnar(model, [sample], eos_token_id=None,
                              cfg=DecodeConfig(max_new_tokens=9))
        assert res.forward_calls == 1 + (9 - 1)
        assert res.new_tokens == 9 * n_branches
        assert all(len(t) == 9 for t in res.tokens[0])
        # the background is held once: background + prompts + the new columns of every branch
        assert res.peak_kv_tokens == 3 + n_branches + 8 * n_branches


def test_forward_calls_follow_the_longest_answer():
    """Branches stop at EOS; the loop ends with the longest answer (1 + (longest - 1) calls)."""
    model = tiny_model(vocab=13, seed=3)  # a small vocabulary: EOS comes up often
    samples = random_samples(4, seed=2, vocab=13)
    res = decode_columnar(model, samples, eos_token_id=EOS, cfg=DecodeConfig(max_new_tokens=30))
    longest = max(len(t) for s in res.tokens for t in s)
    assert res.forward_calls == 1 + (longest - 1)
    stopped = [t for s in res.tokens for t in s if t[-1] == EOS]
    assert stopped and all(EOS not in t[:-1] for t in stopped)
    assert res.new_tokens == sum(len(t) for s in res.tokens for t in s)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_isolated_parallel_equals_sequential_with_equal_prompts(attn):
    model = tiny_model(attn=attn, pair_indices=[])
    samples = random_samples(4, seed=4, prompt_lens=[3, 3, 3])
    cfg = DecodeConfig(max_new_tokens=8)
    par = decode_columnar(model, samples, eos_token_id=EOS, isolate_branches=True, cfg=cfg)
    singles = [BranchSample(s.background, [b]) for s in samples for b in s.branches]
    seq = decode_columnar(model, singles, eos_token_id=EOS, isolate_branches=True, cfg=cfg)
    assert [t for s in par.tokens for t in s] == [s[0] for s in seq.tokens]
    # the test is not vacuous: without isolation branches read each other and answers change
    mixed = decode_columnar(model, samples, eos_token_id=EOS, isolate_branches=False, cfg=cfg)
    assert mixed.tokens != par.tokens


def test_isolated_parallel_equals_sequential_for_the_longest_prompt():
    model = tiny_model(pair_indices=[])
    samples = [BranchSample([3, 4, 5, 6], [Branch([7, 8], []), Branch([9, 10, 11, 12], []),
                                           Branch([13], [])]),
               BranchSample([14], [Branch([15, 16, 17], []), Branch([18], [])])]
    cfg = DecodeConfig(max_new_tokens=8)
    for align_to in ("left", "right"):
        par = decode_columnar(model, samples, eos_token_id=EOS, isolate_branches=True,
                              align_to=align_to, cfg=cfg)
        for i, k in ((0, 1), (1, 0)):  # the longest prompt of each sample
            alone = decode_columnar(model, [BranchSample(samples[i].background,
                                                         [samples[i].branches[k]])],
                                    eos_token_id=EOS, cfg=cfg)
            assert par.tokens[i][k] == alone.tokens[0][0]


def test_plain_baseline_equals_sequential_columnar_with_no_branch_pairs():
    """pair_indices=[] and one branch: the columnar decode is the unpatched model's decode."""
    model = tiny_model(pair_indices=[])
    samples = random_samples(3, seed=5)
    singles = [BranchSample(s.background, [b]) for s in samples for b in s.branches]
    cfg = DecodeConfig(max_new_tokens=7)
    seq = decode_columnar(model, singles, eos_token_id=EOS, cfg=cfg)
    for single, expected in zip(singles, seq.tokens):
        plain = decode_plain(model, [single.background + single.branches[0].prompt],
                             eos_token_id=EOS, pad_token_id=PAD, cfg=cfg)
        assert plain.tokens[0][0] == expected[0]
    # batched: all questions of a context, left-padded, one generate call
    rows = [samples[0].background + b.prompt for b in samples[0].branches]
    batched = decode_plain(model, rows, eos_token_id=EOS, pad_token_id=PAD, cfg=cfg)
    n0 = len(samples[0].branches)
    assert [t[0] for t in batched.tokens] == [s[0] for s in seq.tokens[:n0]]


def test_sampling_is_seeded():
    model = tiny_model()
    samples = random_samples(2, seed=6)
    cfg = DecodeConfig(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=11)
    a = decode_columnar(model, samples, eos_token_id=None, cfg=cfg)
    b = decode_columnar(model, samples, eos_token_id=None, cfg=cfg)
    c = decode_columnar(model, samples, eos_token_id=None,
                        cfg=DecodeConfig(max_new_tokens=6, temperature=1.0, seed=12))
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_lora_model_decodes_through_the_same_path():
    peft = pytest.importorskip("peft")
    model = tiny_model(pair_indices=[7, 8])
    samples = random_samples(2, seed=7)
    cfg = DecodeConfig(max_new_tokens=5)
    before = decode_columnar(model, samples, eos_token_id=EOS, cfg=cfg)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    same = decode_columnar(lora, samples, eos_token_id=EOS, cfg=cfg)
    assert same.tokens == before.tokens  # LoRA B starts at zero: the same function
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    changed = decode_columnar(lora, samples, eos_token_id=EOS, cfg=cfg)
    assert changed.tokens != before.tokens and changed.forward_calls >= 1


def test_prompts_only_drops_targets_keeps_meta():
    s = BranchSample([1], [Branch([2], [3, 4])], meta={"ids": ["a"]})
    (p,) = prompts_only([s])
    assert p.branches[0].target == [] and p.meta == {"ids": ["a"]}


def test_bad_decode_settings():
    with pytest.raises(ValueError, match="eval.max_new_tokens"):
        DecodeConfig(max_new_tokens=0).validate()
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(max_new_tokens=1, top_p=0).validate()


@pytest.mark.parametrize("shared", [12, 0])
def test_prefix_caching_gives_the_one_at_a_time_answers(shared):
    """The context prefilled once and shared: every row decodes as it does alone (greedy)."""
    rng = random.Random(shared)
    context = [rng.randrange(2, 61) for _ in range(shared)]
    rows = [context + [rng.randrange(2, 61) for _ in range(n)] for n in (3, 1, 5, 2)]
    if not shared:
        rows = [[k + 2] + row for k, row in enumerate(rows)]  # nothing in common
    model = tiny_model(pair_indices=[7, 8])
    cfg = DecodeConfig(max_new_tokens=6)
    eos = 9
    alone = [decode_plain(model, [row], eos_token_id=eos, pad_token_id=0, cfg=cfg).tokens[0][0]
             for row in rows]
    together = decode_prefix(model, rows, eos_token_id=eos, pad_token_id=0, cfg=cfg)
    assert [t[0] for t in together.tokens] == alone
    assert common_prefix_length(rows) == shared
    longest = max(len(a) for a in alone)
    assert together.forward_calls == (1 if shared else 0) + longest  # prefix, questions, steps
    assert together.new_tokens == sum(len(a) for a in alone)


def test_the_common_prefix_leaves_every_row_a_token():
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2]]) == 1
    assert common_prefix_length([[1], [2]]) == 0
    assert common_prefix_length([[4, 5, 6]]) == 2  # one row: all but its last token is shared


def test_plain_decoding_counts_the_forwards_of_a_lora_model_too():
    from paradec.models import add_lora

    model = tiny_model()
    lora = add_lora(tiny_model(), {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}, "base")
    rows = [[3, 4, 5, 6]]
    cfg = DecodeConfig(max_new_tokens=5, ignore_eos=True)
    plain = decode_plain(model, rows, eos_token_id=None, pad_token_id=0, cfg=cfg)
    wrapped = decode_plain(lora, rows, eos_token_id=None, pad_token_id=0, cfg=cfg)
    assert plain.forward_calls == wrapped.forward_calls == 5  # one per new token


@pytest.mark.parametrize("mode", ["parallel", "sequential", "prefix", "batched", "baseline",
                                  "joint"])
def test_on_step_sees_every_new_column_of_every_unit(mode):
    """``t`` runs 0 .. T-1 once per decoder call (t = 0 right after its prefill), whatever the
    decoder: what the benchmark times the prefill and the steps apart with."""
    from paradec.config import CollatorConfig
    from paradec.evaluation import run_mode

    model = tiny_model(pair_indices=[7, 8])
    samples = random_samples(2, seed=4)
    T = 3
    seen = []
    _, result = run_mode(mode, model, samples, tokenizer=None, collator_cfg=CollatorConfig(),
                         decode_cfg=DecodeConfig(max_new_tokens=T, ignore_eos=True),
                         batch_size=1, progress=False, eos_token_id=EOS, pad_token_id=PAD,
                         on_step=lambda t, tokens, emitted: seen.append(
                             (t, tuple(tokens.shape), bool(emitted.any()))))
    questions = [len(s.branches) for s in samples]
    units, width, per_unit = {
        "parallel": (len(samples), max(questions), T),
        "sequential": (sum(questions), 1, T), "baseline": (sum(questions), 1, T),
        "prefix": (len(samples), None, T), "batched": (len(samples), None, T),
        "joint": (len(samples), 1, None)}[mode]
    starts = [i for i, (t, _, _) in enumerate(seen) if t == 0]
    assert len(starts) == units and all(emitted for _, _, emitted in seen)
    for a, b in zip(starts, starts[1:] + [len(seen)]):
        ts = [t for t, _, _ in seen[a:b]]
        assert ts == list(range(b - a))  # every column, in order
        if per_unit is not None:
            assert b - a == per_unit
    if width == 1:
        assert all(shape[1] == 1 for _, shape, _ in seen)
    # every token a unit emits is shown once (EOS ignored: every slot of every call)
    assert result.new_tokens == sum(shape[0] * shape[1] for _, shape, _ in seen)


def test_joint_on_a_token_workload_reads_the_questions_in_a_row():
    from paradec.config import CollatorConfig
    from paradec.evaluation import run_mode
    from paradec.prompts import JOINT_LINE_TOKENS

    model = tiny_model(pair_indices=[7, 8])
    sample = BranchSample([5, 6, 7], [Branch([8, 9], []), Branch([10], [])])
    cfg = DecodeConfig(max_new_tokens=2, ignore_eos=True)
    texts, joint = run_mode("joint", model, [sample], tokenizer=None,
                            collator_cfg=CollatorConfig(), decode_cfg=cfg, batch_size=1,
                            progress=False, eos_token_id=EOS, pad_token_id=PAD)
    alone = decode_plain(model, [[5, 6, 7, 8, 9, 10]], eos_token_id=EOS, pad_token_id=PAD,
                         cfg=DecodeConfig(max_new_tokens=2 * (2 + JOINT_LINE_TOKENS),
                                          ignore_eos=True))
    assert texts == [] and joint.tokens == alone.tokens
