"""data=synthetic: answers come only from the background, splits are disjoint, items are right."""

import re
import time
from collections import Counter, defaultdict

import pytest

from paradec.collator import ColumnarCollator
from paradec.layout import Branch, BranchSample
from paradec.tasks import load_task
from paradec.tasks.synthetic import RELATIONS, SyntheticDataConfig, synthetic_background

FACT_RE = re.compile(r"(\w+)'s (\w+) is ([^.]+)\.")
QUESTION_RE = re.compile(r"What is (\w+)'s (\w+)\?")


def fact_triples(text):
    """(relation, entity, value) of every fact of a background."""
    return [(rel, ent, value) for ent, rel, value in FACT_RE.findall(text)]


def question_key(text):
    """(relation, entity) a question asks for."""
    ent, rel = QUESTION_RE.fullmatch(text).groups()
    return rel, ent


def oracle(background: str, question: str) -> str:
    """A reader that answers by looking the question's key up in the background it is given."""
    facts = {(rel, ent): value for rel, ent, value in fact_triples(background)}
    rel, ent = question_key(question)
    return facts.get((rel, ent), "")


def exact_match(pairs) -> float:
    pairs = list(pairs)
    return sum(p == g for p, g in pairs) / len(pairs)


def split_items(cfg, split="validation"):
    return [synthetic_background(cfg, split, i) for i in range(cfg.size(split))]


def test_answers_are_read_from_the_background():
    cfg = SyntheticDataConfig()
    ctxs = split_items(cfg)
    right = [(oracle(c.context, q.question), q.answers[0]) for c in ctxs for q in c.questions]
    assert exact_match(right) == 1.0
    shuffled = ctxs[1:] + ctxs[:1]  # every question gets another background
    wrong = [(oracle(o.context, q.question), q.answers[0])
             for c, o in zip(ctxs, shuffled) for q in c.questions]
    assert exact_match(wrong) < 0.05


def test_answers_are_not_predictable_from_the_question():
    cfg = SyntheticDataConfig()
    answers_by_key = defaultdict(Counter)  # question key (the relation) -> answers in train
    for c in (synthetic_background(cfg, "train", i) for i in range(3000)):
        for q in c.questions:
            answers_by_key[question_key(q.question)[0]][q.answers[0]] += 1
    assert all(len(counter) >= 25 for counter in answers_by_key.values())
    best_guess = {key: counter.most_common(1)[0][0] for key, counter in answers_by_key.items()}
    guesses = [(best_guess[question_key(q.question)[0]], q.answers[0])
               for c in split_items(cfg) for q in c.questions]
    assert exact_match(guesses) < 0.1


def test_each_key_is_unique_in_its_background_by_default():
    for c in split_items(SyntheticDataConfig()):
        relations = [rel for rel, _, _ in fact_triples(c.context)]
        assert len(relations) == len(set(relations)) and 4 <= len(relations) <= 8
        assert len(c.questions) == 4
        for q in c.questions:  # answer_start points at the answer
            assert c.context[q.answer_starts[0]:].startswith(q.answers[0] + ".")


def test_entity_binding_variant():
    cfg = SyntheticDataConfig(entities_per_background=2, min_facts=6, max_facts=6,
                              questions_per_background=6)
    ctxs = split_items(cfg)
    for c in ctxs:
        facts = fact_triples(c.context)
        assert len({e for _, e, _ in facts}) == 2 and len({r for r, _, _ in facts}) == 3
    right = [(oracle(c.context, q.question), q.answers[0]) for c in ctxs for q in c.questions]
    assert exact_match(right) == 1.0

    def relation_only(c, q):  # ignores the entity: the first fact with the relation
        rel = question_key(q.question)[0]
        return next(v for r, _, v in fact_triples(c.context) if r == rel)
    shortcut = exact_match((relation_only(c, q), q.answers[0]) for c in ctxs for q in c.questions)
    assert 0.4 < shortcut < 0.65


def test_deterministic_and_splits_never_share_a_background():
    cfg = SyntheticDataConfig(train_size=3000)
    assert synthetic_background(cfg, "train", 17) == synthetic_background(cfg, "train", 17)
    assert synthetic_background(cfg, "train", 17) != synthetic_background(cfg, "train", 18)
    other_seed = SyntheticDataConfig(seed=1)
    assert synthetic_background(cfg, "test", 0) != synthetic_background(other_seed, "test", 0)
    texts = {split: {c.context for c in split_items(cfg, split)} for split in
             ("train", "validation", "test")}
    assert len(texts["validation"]) == 300 and len(texts["train"]) == 3000
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]


def test_generation_is_fast():
    cfg = SyntheticDataConfig()
    start = time.perf_counter()
    for i in range(2000):
        synthetic_background(cfg, "train", i)
    assert time.perf_counter() - start < 1.0


def test_qa_items(tokenizer):
    task = load_task({"name": "synthetic", "questions_per_background": 4})
    ds = task.dataset("validation", tokenizer, "qa", branches_per_sample=3)
    assert len(ds) == 2 * 300  # 4 questions -> groups of 3 and 1
    a, b = ds[0], ds[1]
    assert isinstance(a, BranchSample) and [len(a.branches), len(b.branches)] == [3, 1]
    assert a.background == b.background and a.meta["context_id"] == b.meta["context_id"]
    ctx = synthetic_background(task.config, "validation", 0)
    assert tokenizer.decode(a.background) == ctx.context
    assert a.meta["ids"] + b.meta["ids"] == [q.id for q in ctx.questions]
    eos = tokenizer.eos_token_id
    for branch, q in zip(a.branches + b.branches, ctx.questions):
        assert tokenizer.decode(branch.prompt) == f"\nQ: {q.question}\nA:"
        assert branch.target[-1] == eos and tokenizer.decode(branch.target[:-1]) == \
            f" {q.answers[0]}"
    batch = ds.__getitems__([0, 1, 5])  # the DataLoader's batched fetch gives the same items
    assert batch[:2] == [a, b] and batch[2] == ds[5]
    with pytest.raises(IndexError):
        ds[len(ds)]
    ColumnarCollator()(batch)


def test_text_items(tokenizer):
    task = load_task({"name": "synthetic"})
    ds = task.dataset("train", tokenizer, "text")
    assert len(ds) == 20_000
    item = ds[3]
    assert isinstance(item, Branch) and item.prompt == [] and item.target[-1] == \
        tokenizer.eos_token_id
    text = tokenizer.decode(item.target[:-1])
    ctx = synthetic_background(task.config, "train", 3)
    assert text.startswith(ctx.context)
    for q in ctx.questions:  # text_qa: the document teaches the QA format
        assert f"\nQ: {q.question}\nA: {q.answers[0]}" in text
    assert next(iter(task.texts("train"))) == tokenizer.decode(ds[0].target[:-1])
    plain = load_task({"name": "synthetic", "text_qa": False}).dataset("train", tokenizer, "text")
    assert tokenizer.decode(plain[3].target[:-1]) == ctx.context
    layout = ColumnarCollator(branches_per_sample=4)([ds[i] for i in range(8)])
    assert layout.num_branches.tolist() == [4, 4]


def test_multi_word_answers():
    cfg = SyntheticDataConfig(min_answer_words=2, max_answer_words=3)
    for c in split_items(cfg)[:50]:
        for q in c.questions:
            assert 2 <= len(q.answers[0].split()) <= 3
            assert oracle(c.context, q.question) == q.answers[0]


@pytest.mark.parametrize("bad, key", [
    ({"questions_per_background": 5}, "questions_per_background"),
    ({"min_facts": 9}, "min_facts"),
    ({"max_facts": 40}, "max_facts"),
    ({"validation_size": 0}, "validation_size"),
    ({"template": {"background": "no context here"}}, "template.background"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=f"data.{key}"):
        load_task({"name": "synthetic", **bad})


def test_value_pools_are_disjoint_words():
    words = [w for pool in RELATIONS.values() for w in pool]
    assert len(words) == len(set(words)) == 32 * len(RELATIONS)
