"""Bad input: each case is a DataError whose one-line message names the file (and the record),
raised when the task or dataset is built. Also: configs (YAML == schema, DictConfig loading)."""

import dataclasses
import gzip
import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from paradec.tasks import DATA_SCHEMAS, DataError, data_config, load_task
from tests.conftest import write

from .test_tasks_squad import NORMANS, official

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def build(task: str, path: Path, split: str, tokenizer, tmp_path):
    """Build the task and the dataset of ``split`` (what run.py does before any model exists)."""
    cfg = {"name": task, "path": str(path)}
    if task == "squad":
        cfg["eval_path"] = str(path)
    else:
        cfg.update(cache_dir=str(tmp_path / "cache"), val_fraction=0.0)
    return load_task(cfg).dataset(split, tokenizer, "qa" if task == "squad" else "text", 4)


def expect_error(tokenizer, tmp_path, task, path, *needles, split="train"):
    with pytest.raises(DataError) as err:
        build(task, path, split, tokenizer, tmp_path)
    message = str(err.value)
    assert "\n" not in message, message
    assert Path(path).name in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("task", ["squad", "fineweb"])
def test_missing_file(tokenizer, tmp_path, task):
    expect_error(tokenizer, tmp_path, task, tmp_path / "nope.json", "no such file")
    expect_error(tokenizer, tmp_path, task, tmp_path / "nope-*.jsonl", "no file matches")


@pytest.mark.parametrize("task, name", [("squad", "e.json"), ("squad", "e.json.gz"),
                                        ("squad", "e.jsonl"), ("fineweb", "e.jsonl"),
                                        ("fineweb", "e.txt"), ("fineweb", "e.txt.gz"),
                                        ("fineweb", "e.json")])
def test_empty_file(tokenizer, tmp_path, task, name):
    expect_error(tokenizer, tmp_path, task, write(tmp_path / name, "\n  \n"), "empty file")


@pytest.mark.parametrize("name", ["t.json", "t.json.gz"])
def test_truncated_json(tokenizer, tmp_path, name):
    text = json.dumps(official())
    path = write(tmp_path / name, text[: len(text) // 2])
    expect_error(tokenizer, tmp_path, "squad", path, "truncated JSON")


def test_invalid_json(tokenizer, tmp_path):
    path = write(tmp_path / "bad.json", '{"data": [}')
    expect_error(tokenizer, tmp_path, "squad", path, "invalid JSON at line 1")
    path = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    expect_error(tokenizer, tmp_path, "fineweb", path, "line 2", "invalid JSON")


def test_corrupt_gzip(tokenizer, tmp_path):
    raw = gzip.compress(json.dumps(official()).encode())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(raw[: len(raw) // 2])
    expect_error(tokenizer, tmp_path, "squad", path, "gzip")


def test_json_that_is_not_squad(tokenizer, tmp_path):
    path = write(tmp_path / "other.json", json.dumps({"version": "1.1", "articles": []}))
    expect_error(tokenizer, tmp_path, "squad", path, "not SQuAD", "no 'data' list")
    doc = official()
    del doc["data"][1]["paragraphs"][0]["qas"][0]["question"]
    path = write(tmp_path / "noq.json", json.dumps(doc))
    expect_error(tokenizer, tmp_path, "squad", path, "data[1].paragraphs[0].qas[0] (id r1)",
                 "missing 'question'")


def test_record_without_text_field(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    expect_error(tokenizer, tmp_path, "fineweb", path, "line 2", "no 'text' field")
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    expect_error(tokenizer, tmp_path, "fineweb", path, "no column 'text'")


def test_streaming_checks_every_file_up_front(tmp_path):
    good = write(tmp_path / "good.jsonl", '{"text": "a"}\n')
    bad = write(tmp_path / "bad.jsonl", '{"body": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl: line 1"):
        load_task({"name": "fineweb", "path": [str(good), str(bad)], "streaming": True})


def mismatched_doc():
    doc = official()
    doc["data"][0]["paragraphs"][0]["qas"][2]["answers"][0]["answer_start"] += 3  # n3, Rollo
    return doc


def test_answer_start_mismatch_training_skips_and_counts(tokenizer, tmp_path, caplog):
    path = write(tmp_path / "m.json", json.dumps(mismatched_doc()))
    with caplog.at_level(logging.WARNING, logger="paradec.tasks"):
        ds = load_task({"name": "squad", "path": str(path), "eval_path": str(path)}).dataset(
            "train", tokenizer, "qa", 4)
    assert ds.stats.skipped_mismatch == 1
    assert "n3" not in [i for s in ds for i in s.meta["ids"]]
    assert "skipped 1 questions whose answer_start does not match" in caplog.text


def test_answer_start_mismatch_evaluation_fails(tokenizer, tmp_path):
    path = write(tmp_path / "m.json", json.dumps(mismatched_doc()))
    expect_error(tokenizer, tmp_path, "squad", path, "question n3", "'Rollo'",
                 "answer_start", split="validation")
    assert NORMANS.index("Rollo") > 0


# --- configs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DATA_SCHEMAS))
def test_data_file_composes_to_the_schema_defaults(name):
    """A data file selects its schema, whose dataclass holds every default (stated once)."""
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    assert OmegaConf.to_container(raw)["defaults"] == [f"{name}_schema", "_self_"]
    raw.pop("defaults")
    composed = OmegaConf.merge(OmegaConf.structured(DATA_SCHEMAS[name]), raw)
    assert OmegaConf.to_container(composed) == dataclasses.asdict(DATA_SCHEMAS[name]())
    first = (CONF / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# python run.py") and f"data={name}" in first


def test_load_task_from_dictconfig_and_structured(tmp_path, tokenizer):
    structured = OmegaConf.structured(DATA_SCHEMAS["synthetic"])
    cfg = OmegaConf.merge(structured, {"train_size": 7, "template": {"answer": " = {answer}"}})
    task = load_task(cfg)
    assert task.config.train_size == 7 and task.config.template.answer == " = {answer}"
    assert load_task(OmegaConf.to_object(cfg)).config == task.config
    with pytest.raises(ValueError, match="data.bogus"):
        data_config({"name": "synthetic", "bogus": 1})
    with pytest.raises(ValueError, match="data.name"):
        data_config({"name": "imagenet"})
