"""Prompts of the unpatched contenders: chat template, joint prompt and parsing, training rows."""

import copy

import pytest

from paradec.collator import ColumnarCollator
from paradec.config import CollatorConfig, DecodeConfig, EvalConfig
from paradec.evaluation import evaluate, prompt_style, run_mode
from paradec.layout import Branch, BranchSample
from paradec.prompts import (
    JOINT_ANSWERS,
    JOINT_QUESTIONS,
    chat_ids,
    joint_prompt,
    joint_training_sample,
    parse_joint,
    single_prompts,
    single_training_samples,
)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qa_sample(tok, context="The color of Kelo is red. The fruit of Kelo is pear.",
              questions=("What is the color of Kelo?", "What is the fruit of Kelo?"),
              answers=("red", "pear"), ids=None):
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    branches = [Branch(enc(f"\nQ: {q}\nA:"), enc(f" {a}") + [tok.eos_token_id])
                for q, a in zip(questions, answers)]
    meta = {"ids": list(ids or [f"q{i}" for i in range(len(questions))]),
            "questions": list(questions), "answers": [[a] for a in answers]}
    return BranchSample(enc(context), branches, meta)


# --- parsing a joint reply ----------------------------------------------------------------------

@pytest.mark.parametrize("reply, n, expected", [
    ("1. red\n2. pear", 2, ["red", "pear"]),
    ("1) red\n2) pear\n", 2, ["red", "pear"]),
    ("1: red\n2: pear", 2, ["red", "pear"]),
    ("Answer 1: red\nAnswer 2: pear", 2, ["red", "pear"]),
    ("A1: red\nA2 - pear", 2, ["red", "pear"]),
    ("**1.** red\n**2.** pear", 2, ["red", "pear"]),
    ("Sure! Here are the answers:\n1. red\n2. pear\nHope this helps.", 2, ["red", "pear"]),
    ("1. red", 3, ["red", "", ""]),                     # fewer answers than questions
    ("2. pear", 2, ["", "pear"]),                       # a missing answer is never shifted
    ("1. red\n1. blue\n2. pear", 2, ["red", "pear"]),   # the first line of a number wins
    ("1. red\n3. pear\n7. plum", 2, ["red", ""]),       # numbers beyond K are ignored
    ("red and pear", 2, ["", ""]),                      # nothing numbered: nothing answered
    ("red", 1, ["red"]),                                # one question may go unnumbered
    ("\n  1. 1990\n2. 25%", 2, ["1990", "25%"]),        # numbers inside answers stay
    ("", 2, ["", ""]),
])
def test_parse_joint(reply, n, expected):
    assert parse_joint(reply, n) == expected


# --- prompts --------------------------------------------------------------------------------------

def test_the_chat_prompt_is_the_tokenizers_template(chat_tokenizer):
    sample = qa_sample(chat_tokenizer)
    rows = single_prompts(sample, chat_tokenizer, "chat")
    assert len(rows) == 2
    for row, question in zip(rows, sample.meta["questions"]):
        text = chat_tokenizer.decode(row)
        message = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        expected = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False)
        assert row == chat_tokenizer(expected, add_special_tokens=False).input_ids
        assert "The color of Kelo is red." in message and question in message
        assert text.endswith("<|im_start|>assistant\n")


def test_plain_prompts_are_context_then_question(tokenizer):
    sample = qa_sample(tokenizer)
    assert single_prompts(sample, tokenizer, "plain") == [
        sample.background + b.prompt for b in sample.branches]


def test_chat_without_a_template_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="eval.prompt=plain"):
        chat_ids(tokenizer, "hello")


def test_prompt_style_auto(tokenizer, chat_tokenizer):
    assert prompt_style("auto", chat_tokenizer, None) == "chat"
    assert prompt_style("auto", chat_tokenizer, "columnar") == "plain"  # paradec finetuned it
    assert prompt_style("auto", tokenizer, None) == "plain"            # no template
    assert prompt_style("chat", chat_tokenizer, "single") == "chat"    # an explicit choice wins
    with pytest.raises(ValueError, match="eval.prompt"):
        EvalConfig(prompt="fancy").validate()


def test_joint_prompt_numbers_every_question(tokenizer, chat_tokenizer):
    sample = qa_sample(tokenizer, questions=("Q one?", "Q two?", "Q three?"),
                       answers=("a", "b", "c"))
    plain = joint_prompt(sample, tokenizer, "plain")
    assert plain[:len(sample.background)] == sample.background
    assert tokenizer.decode(plain[len(sample.background):]) == (
        JOINT_QUESTIONS + "1. Q one?\n2. Q two?\n3. Q three?" + JOINT_ANSWERS)
    chat = chat_tokenizer.decode(joint_prompt(sample, chat_tokenizer, "chat"))
    assert "1. Q one?\n2. Q two?\n3. Q three?" in chat and "The color of Kelo" in chat


def test_a_joint_control_is_evaluated_exactly_as_it_was_trained(tokenizer):
    sample = qa_sample(tokenizer)
    row = joint_training_sample(sample, tokenizer, tokenizer.eos_token_id)
    assert len(row.branches) == 1
    assert row.background + row.branches[0].prompt == joint_prompt(sample, tokenizer, "plain")
    assert tokenizer.decode(row.branches[0].target[:-1]) == "1. red\n2. pear"
    assert row.branches[0].target[-1] == tokenizer.eos_token_id
    assert parse_joint(tokenizer.decode(row.branches[0].target[:-1]), 2) == ["red", "pear"]


def test_single_rows_copy_the_context_and_split_the_meta(tokenizer):
    sample = qa_sample(tokenizer)
    rows = single_training_samples(sample)
    assert [r.background for r in rows] == [sample.background] * 2
    assert [r.branches for r in rows] == [[b] for b in sample.branches]
    assert [r.meta["ids"] for r in rows] == [["q0"], ["q1"]]


# --- the collator's formats: the same questions, other rows ----------------------------------

def _drawn(collator, batches):
    """The question ids each batch trains on, and the layouts."""
    out = []
    for items in batches:
        samples = collator.group(items)
        out.append([i for s in samples for i in s.meta["ids"]])
    return out


def test_every_format_trains_the_same_seeded_questions(tokenizer):
    samples = [qa_sample(tokenizer, questions=[f"Question {c}-{k}?" for k in range(4)],
                         answers=["red"] * 4, ids=[f"{c}-{k}" for k in range(4)])
               for c in range(6)]
    batches = [samples[:3], samples[3:]]
    config = dict(min_branches_per_sample=1, max_branches_per_sample=4, seed=3)
    drawn = {}
    for fmt in ("columnar", "single", "joint"):
        collator = ColumnarCollator(CollatorConfig(format=fmt, **config),
                                    pad_id=tokenizer.pad_token_id, tokenizer=tokenizer)
        drawn[fmt] = _drawn(collator, batches)
        collator = ColumnarCollator(CollatorConfig(format=fmt, **config),
                                    pad_id=tokenizer.pad_token_id, tokenizer=tokenizer)
        layouts = [collator(b) for b in batches]
        n_questions = [len(ids) for ids in drawn[fmt]]
        rows = {"columnar": [len(b) for b in batches], "single": n_questions,
                "joint": [len(b) for b in batches]}[fmt]
        assert [layout.input_ids.shape[0] for layout in layouts] == rows, fmt
        if fmt != "columnar":
            assert all(int(layout.branch.max()) == 1 for layout in layouts)  # plain rows
    assert drawn["columnar"] == drawn["single"] == drawn["joint"]


def test_joint_format_needs_the_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        ColumnarCollator(CollatorConfig(format="joint"))
    with pytest.raises(ValueError, match="collator.format"):
        CollatorConfig(format="zigzag").validate()


# --- the joint mode end to end ----------------------------------------------------------------

def test_joint_mode_answers_every_question_once(tokenizer, tmp_path):
    from tests.tiny import tiny_model

    model = tiny_model(vocab=len(tokenizer), pair_indices=[7, 8])
    samples = [qa_sample(tokenizer), qa_sample(tokenizer, questions=("Which city?",),
                                               answers=("Paris",), ids=["c"])]
    answers, result = run_mode("joint", model, samples, tokenizer=tokenizer,
                               collator_cfg=CollatorConfig(), batch_size=4, prompt="plain",
                               decode_cfg=DecodeConfig(max_new_tokens=3))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # one generate per sample, for at most K x (max_new_tokens + a line's numbering) tokens
    assert result.forward_calls <= 2 * (3 + 4) + 1 * (3 + 4)
    report = evaluate(model, tokenizer, samples, EvalConfig(modes=["joint", "baseline"],
                                                           max_new_tokens=3), CollatorConfig(),
                      tmp_path)
    assert report["joint"]["n_questions"] == 3 and report["joint"]["prompt"] == "plain"
