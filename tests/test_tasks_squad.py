"""data=squad: questions grouped by context, templates, truncation, formats, splits, real counts."""

import json
import logging
import os
from pathlib import Path

import pytest

from paradec.layout import BranchSample, build_layout
from paradec.tasks import DataError, load_task
from tests.conftest import write

# --- fixtures in the official formats ------------------------------------------------------------

NORMANS = ("The Normans were the people who gave their name to Normandy, a region in France. "
           "They descended from Norse raiders from Denmark, Iceland and Norway. Their leader "
           "Rollo swore fealty to King Charles III in the 10th century.")
RHINE = "The Rhine flows from the Alps to the North Sea. It is 1,230 km long."


def qa(qid, question, answers, context, impossible=False):
    out = {"id": qid, "question": question,
           "answers": [] if impossible else [{"text": a, "answer_start": context.index(a)}
                                             for a in answers]}
    if impossible:
        out["is_impossible"] = True
        out["plausible_answers"] = [{"text": "Alps", "answer_start": context.index("Alps")}]
    return out


def official(v2=False):
    """A tiny SQuAD file: Normans (5 questions), Rhine (1 question, +1 unanswerable in v2)."""
    normans = [qa("n1", "In what country is Normandy?", ["France", "France"], NORMANS),
               qa("n2", "From which countries did the Norse come?",
                  ["Denmark, Iceland and Norway"], NORMANS),
               qa("n3", "Who was the Norse leader?", ["Rollo", "Rollo"], NORMANS),
               qa("n4", "Which king did Rollo swear fealty to?", ["King Charles III"], NORMANS),
               qa("n5", "In what century?", ["10th century", "the 10th century"], NORMANS)]
    rhine = [qa("r1", "Where does the Rhine end?", ["North Sea"], RHINE)]
    if v2:
        for q in normans + rhine:
            q["is_impossible"] = False
        rhine.append(qa("r2", "Who named the Rhine?", [], RHINE, impossible=True))
    return {"version": "v2.0" if v2 else "1.1", "data": [
        {"title": "Normans", "paragraphs": [{"context": NORMANS, "qas": normans}]},
        {"title": "Rhine", "paragraphs": [{"context": RHINE, "qas": rhine}]}]}


def as_rows(doc):
    """The Hub's row format of an official document."""
    return [{"id": q["id"], "title": art["title"], "context": p["context"],
             "question": q["question"],
             "answers": {"text": [a["text"] for a in q["answers"]],
                         "answer_start": [a["answer_start"] for a in q["answers"]]}}
            for art in doc["data"] for p in art["paragraphs"] for q in p["qas"]]


def squad_task(tmp_path, doc=None, name="train.json", **cfg):
    path = write(tmp_path / name, json.dumps(doc or official()))
    return load_task({"name": "squad", "path": str(path), "eval_path": str(path), **cfg})


def text_of(tokenizer, ids):
    return tokenizer.decode(ids)


# --- grouping and encoding ------------------------------------------------------------------------

def test_questions_of_a_context_become_branches(tmp_path, tokenizer):
    ds = squad_task(tmp_path).dataset("train", tokenizer, "qa", branches_per_sample=2)
    assert all(isinstance(s, BranchSample) for s in ds)
    # Normans: 5 questions -> 2 + 2 + 1; Rhine: 1. No question dropped, none twice.
    assert [len(s.branches) for s in ds] == [2, 2, 1, 1]
    assert [i for s in ds for i in s.meta["ids"]] == ["n1", "n2", "n3", "n4", "n5", "r1"]
    assert [s.meta["context_id"] for s in ds] == ["Normans#0"] * 3 + ["Rhine#0"]
    first = ds[0]
    assert text_of(tokenizer, first.background) == NORMANS
    eos = tokenizer.eos_token_id
    assert text_of(tokenizer, first.branches[0].prompt) == "\nQ: In what country is Normandy?\nA:"
    assert first.branches[0].target[-1] == eos and eos not in first.branches[0].target[:-1]
    assert text_of(tokenizer, first.branches[0].target[:-1]) == " France"
    assert first.meta["answers"] == [["France", "France"], ["Denmark, Iceland and Norway"]]
    assert first.meta["questions"][1] == "From which countries did the Norse come?"
    assert first.meta["truncated"] is False
    assert ds.stats.questions == 6 and ds.stats.contexts == 2 and ds.stats.samples == 4
    build_layout(list(ds))  # the samples lay out


def test_training_uses_first_answer_eval_keeps_all(tmp_path, tokenizer):
    task = squad_task(tmp_path)
    val = task.dataset("validation", tokenizer, "qa", branches_per_sample=8)
    n5 = val[0].meta["ids"].index("n5")
    assert val[0].meta["answers"][n5] == ["10th century", "the 10th century"]
    assert text_of(tokenizer, val[0].branches[n5].target[:-1]) == " 10th century"


def test_templates_are_configurable(tmp_path, tokenizer):
    template = {"background": "Title: {title}\n{context}", "question": " Question: {question}",
                "answer": " Answer: {answer}"}
    ds = squad_task(tmp_path, template=template).dataset("train", tokenizer, "qa", 4)
    assert text_of(tokenizer, ds[0].background) == f"Title: Normans\n{NORMANS}"
    assert text_of(tokenizer, ds[0].branches[0].prompt) == " Question: In what country is Normandy?"
    assert text_of(tokenizer, ds[0].branches[0].target[:-1]) == " Answer: France"
    with pytest.raises(ValueError, match="data.template.question"):
        squad_task(tmp_path, template={"question": "{query}"})


def test_squad2_unanswerable_target(tmp_path, tokenizer):
    ds = squad_task(tmp_path, official(v2=True)).dataset("train", tokenizer, "qa", 4)
    rhine = ds[-1]
    assert rhine.meta["ids"] == ["r1", "r2"] and rhine.meta["impossible"] == [False, True]
    assert text_of(tokenizer, rhine.branches[1].target[:-1]) == " unanswerable"
    assert rhine.meta["answers"][1] == ["unanswerable"]
    ds = squad_task(tmp_path, official(v2=True), unanswerable="no answer").dataset(
        "validation", tokenizer, "qa", 4)
    assert text_of(tokenizer, ds[-1].branches[1].target[:-1]) == " no answer"


def test_min_questions_filters_contexts(tmp_path, tokenizer):
    ds = squad_task(tmp_path, min_questions=2).dataset("train", tokenizer, "qa", 4)
    assert {s.meta["context_id"] for s in ds} == {"Normans#0"}


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "rows.json", "json.gz"])
def test_hub_row_formats_match_official(tmp_path, tokenizer, fmt):
    doc = official(v2=True)
    ref = squad_task(tmp_path, doc).dataset("validation", tokenizer, "qa", 3)
    path = tmp_path / f"data.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(as_rows(doc)), path)
    elif fmt.startswith("jsonl"):
        write(path, "\n".join(json.dumps(r) for r in as_rows(doc)) + "\n")
    elif fmt == "rows.json":
        write(path, json.dumps(as_rows(doc)))
    else:
        write(path, json.dumps(doc))
    got = load_task({"name": "squad", "eval_path": str(path)}).dataset("validation", tokenizer,
                                                                      "qa", 3)
    assert [(s.background, s.branches, s.meta) for s in got] == \
           [(s.background, s.branches, s.meta) for s in ref]


# --- context budget -------------------------------------------------------------------------------

def long_doc():
    """One context of ~60 sentences; three answers near the start, middle and end."""
    filler = [f"Sentence number {i} says nothing at all." for i in range(60)]
    filler[2] = "The first answer is Alpha."
    filler[30] = "The middle answer is Bravo."
    filler[58] = "The last answer is Charlie."
    context = " ".join(filler)
    qas = [qa("a", "First?", ["Alpha"], context), qa("b", "Middle?", ["Bravo"], context),
           qa("c", "Last?", ["Charlie"], context)]
    return {"data": [{"title": "Long", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_training_truncates_around_the_answers(tmp_path, tokenizer, caplog):
    task = squad_task(tmp_path, long_doc(), max_context_tokens=64)
    with caplog.at_level(logging.INFO, logger="paradec.tasks"):
        ds = task.dataset("train", tokenizer, "qa", branches_per_sample=4)
    assert "truncated 1 contexts" in caplog.text
    assert ds.stats.truncated == 1
    # Answers far apart go to different windows; every question kept, each window <= budget and
    # containing its answer.
    assert sorted(i for s in ds for i in s.meta["ids"]) == ["a", "b", "c"]
    for s in ds:
        assert len(s.background) <= 64 and s.meta["truncated"]
        bg = text_of(tokenizer, s.background)
        for answers in s.meta["answers"]:
            assert answers[0] in bg


def test_evaluation_never_truncates_silently(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="paradec.tasks"):
        ds = squad_task(tmp_path, long_doc(), max_context_tokens=64).dataset(
            "validation", tokenizer, "qa", 4)
    assert "1 of 1 contexts exceed max_context_tokens=64" in caplog.text
    assert ds.stats.over_budget == 1 and len(ds[0].background) > 64
    assert not ds[0].meta["truncated"]
    ds = squad_task(tmp_path, long_doc(), max_context_tokens=64, eval_overflow="truncate").dataset(
        "validation", tokenizer, "qa", 4)
    assert len(ds[0].background) == 64 and ds[0].meta["truncated"] and ds.stats.truncated == 1
    with pytest.raises(DataError, match="context Long#0.*eval_overflow=error"):
        squad_task(tmp_path, long_doc(), max_context_tokens=64, eval_overflow="error").dataset(
            "validation", tokenizer, "qa", 4)


# --- splits ---------------------------------------------------------------------------------------

def test_held_out_validation_slice_by_article(tmp_path, tokenizer):
    doc = {"data": [{"title": f"Article {i}",
                     "paragraphs": [{"context": RHINE, "qas": [qa(f"q{i}", "Where?", ["North Sea"],
                                                                  RHINE)]}]} for i in range(40)]}
    path = write(tmp_path / "train.json.gz", json.dumps(doc))
    task = load_task({"name": "squad", "path": str(path), "val_fraction": 0.25})
    train = {i for s in task.dataset("train", tokenizer, "qa", 4) for i in s.meta["ids"]}
    val = {i for s in task.dataset("validation", tokenizer, "qa", 4) for i in s.meta["ids"]}
    assert train and val and not train & val and len(train | val) == 40
    with pytest.raises(DataError, match="test_path"):
        task.dataset("test", tokenizer, "qa", 4)


def test_text_kind_from_contexts(tmp_path, tokenizer):
    ds = squad_task(tmp_path, seq_length=16).dataset("train", tokenizer, "text")
    chunks = [b.target for b in ds]
    assert all(b.prompt == [] for b in ds) and all(1 <= len(c) <= 16 for c in chunks)
    eos = tokenizer.eos_token_id
    flat = [t for c in chunks for t in c]
    assert flat.count(eos) == 2
    assert tokenizer.decode(flat[: flat.index(eos)]) == NORMANS


def test_hub_unreachable_is_a_one_line_data_error(tokenizer):
    task = load_task({"name": "squad", "hub_id": "no-such-owner/no-such-squad"})
    with pytest.raises(DataError) as err:
        task.dataset("validation", tokenizer, "qa", 4)
    assert "no-such-owner/no-such-squad" in str(err.value) and "\n" not in str(err.value)


# --- the real files (only with PARADEC_DATA_DIR) --------------------------------------------------

DATA_DIR = os.environ.get("PARADEC_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="PARADEC_DATA_DIR is not set")


@needs_data
@pytest.mark.parametrize("name, questions, contexts, impossible", [
    ("squad-v1.1-train-subset.json.gz", 11_877, 2_430, 0),
    ("squad-v1.1-dev-a.json.gz", 4_961, 913, 0),
    ("squad-v2.0-dev-5articles.json.gz", 1_407, 173, 702),
])
def test_real_squad_files_load(tokenizer, name, questions, contexts, impossible):
    path = Path(DATA_DIR) / "squad" / name
    task = load_task({"name": "squad", "eval_path": str(path), "max_context_tokens": None})
    ds = task.dataset("validation", tokenizer, "qa", branches_per_sample=4)
    ids = [i for s in ds for i in s.meta["ids"]]
    assert len(ids) == len(set(ids)) == questions
    assert len({s.meta["context_id"] for s in ds}) == contexts
    assert sum(x for s in ds for x in s.meta["impossible"]) == impossible
    assert all(len(s.branches) <= 4 for s in ds)
    if "dev" in name and "v1.1" in name:
        assert max(len(a) for s in ds for a in s.meta["answers"]) >= 3  # all gold answers kept


@needs_data
def test_real_squad_train_with_budget(tokenizer):
    path = Path(DATA_DIR) / "squad" / "squad-v1.1-train-subset.json.gz"
    task = load_task({"name": "squad", "path": str(path), "max_context_tokens": 256})
    train = task.dataset("train", tokenizer, "qa", branches_per_sample=4)
    val = task.dataset("validation", tokenizer, "qa", branches_per_sample=4)
    assert train.stats.truncated > 0 and all(len(s.background) <= 256 for s in train)
    assert train.stats.skipped_mismatch == 0
    kept = train.stats.questions + train.stats.skipped_long_answer + val.stats.questions
    assert kept == 11_877  # the held-out articles plus the training ones: nothing lost
    train_titles = {s.meta["context_id"].split("#")[0] for s in train}
    assert not train_titles & {s.meta["context_id"].split("#")[0] for s in val}
