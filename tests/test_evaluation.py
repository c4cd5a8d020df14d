"""Official SQuAD v1.1 scoring on hand-made cases, and evaluate() writing its artefacts."""

import json

import pytest

from paradec.config import CollatorConfig, EvalConfig
from paradec.evaluation import (
    best_score,
    evaluate,
    exact_match,
    f1_score,
    format_table,
    normalize_answer,
)
from paradec.layout import Branch, BranchSample


@pytest.mark.parametrize("raw, norm", [
    ("The Cat!", "cat"),
    ("  an   apple a day ", "apple day"),
    ("U.S. Army", "us army"),
    ("Theatre, the", "theatre"),  # 'the' only as a whole word
    ("A", ""),
    ("rock-'n'-roll", "rocknroll"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_em_and_f1():
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    assert f1_score("the big cat", "big dog") == pytest.approx(0.5)
    assert f1_score("cat", "dog") == 0.0
    assert f1_score("", "dog") == 0.0
    # repeated tokens count as often as they appear in both
    assert f1_score("a b b", "b b c") == pytest.approx(2 * (2 / 3) * (2 / 2) / (2 / 3 + 1))


def test_max_over_gold_answers():
    golds = ["Denver Broncos", "the Broncos", "Broncos"]
    assert best_score(exact_match, "broncos", golds) == 1.0
    assert best_score(f1_score, "Denver", golds) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert best_score(exact_match, "anything", []) == 0.0


def test_bad_eval_config():
    with pytest.raises(ValueError, match="eval.modes"):
        EvalConfig(modes=["parallel", "fast"]).validate()
    with pytest.raises(ValueError, match="eval.batch_size"):
        EvalConfig(batch_size=0).validate()


class CharTokenizer:
    """Just enough tokenizer for evaluate(): ids 2.. are letters, 1 is EOS, 0 pad."""

    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 2) for i in ids if i >= 2)


def test_evaluate_writes_every_question_once_per_mode(tmp_path):
    from tests.tiny import tiny_model

    model = tiny_model(vocab=28)
    samples = [
        BranchSample([3, 4, 5], [Branch([6, 7], [8, 1]), Branch([9], [10, 1])],
                     meta={"ids": ["q1", "q2"], "answers": [["g"], ["i", "j"]]}),
        BranchSample([11], [Branch([12], [13, 1])], meta={"ids": ["q3"], "answers": [["l"]]}),
    ]
    cfg = EvalConfig(modes=["parallel", "sequential", "baseline", "batched"], max_new_tokens=4,
                     batch_size=2)
    report = evaluate(model, CharTokenizer(), samples, cfg, CollatorConfig(), tmp_path,
                      progress=False)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == report and list(saved) == cfg.modes
    for row in saved.values():
        assert row["n_questions"] == 3 and 0 <= row["em"] <= 1 and 0 <= row["f1"] <= 1
        assert {"wall_s", "questions_per_s", "new_tokens", "forward_calls",
                "peak_kv_tokens"} <= set(row)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    for mode in cfg.modes:
        ids = sorted(r["id"] for r in lines if r["mode"] == mode)
        assert ids == ["q1", "q2", "q3"]
    q2 = next(r for r in lines if r["id"] == "q2" and r["mode"] == "parallel")
    assert q2["answers"] == ["i", "j"] and q2["sample"] == 0 and q2["prompt_tokens"] == 1
    # parallel: one forward per column per batch; sequential: one question per sample
    assert saved["parallel"]["forward_calls"] <= 4
    assert "| em |" in format_table(report)


def test_first_contexts_keeps_every_question_of_a_context():
    from paradec.evaluation import first_contexts

    def sample(ctx):
        return BranchSample([1], [Branch([2], [3])], meta={"context_id": ctx})

    data = [sample("a"), sample("a"), sample("b"), sample("c"), sample("c")]
    assert [s.meta["context_id"] for s in first_contexts(data, 2)] == ["a", "a", "b"]
    assert len(first_contexts(data, 0)) == 5


def test_a_context_stride_spreads_the_contexts_and_keeps_their_questions():
    from paradec.evaluation import first_contexts

    contexts = ["a", "a", "b", "c", "c", "d", "e", "f", "f"]  # a context may span samples
    data = [BranchSample([1], [Branch([2], [3])], {"context_id": c}) for c in contexts]
    picked = lambda *args: [s.meta["context_id"] for s in first_contexts(data, *args)]  # noqa: E731
    assert picked(0, 2) == ["a", "a", "c", "c", "e"]
    assert picked(2, 2) == ["a", "a", "c", "c"]
    assert picked(0, 1) == contexts
    with pytest.raises(ValueError, match="eval.context_stride"):
        EvalConfig(context_stride=0).validate()
