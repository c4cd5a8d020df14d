"""data=fineweb: local formats, chunking, held-out split, streaming, real files."""

import json
import os
from pathlib import Path

import pytest

from paradec.collator import ColumnarCollator
from paradec.layout import Branch
from paradec.tasks import load_task
from paradec.tasks.text import chunk_documents
from tests.conftest import write

DOCS = [f"Document {i}. " + " ".join(f"word{i}x{j}" for j in range(5 + 7 * i)) for i in range(12)]


def write_docs(path: Path, docs=DOCS, field="text") -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path)
        return path
    if name.endswith(".jsonl"):
        lines = (json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))
        return write(path, "".join(lines))
    if name.endswith(".json"):
        return write(path, json.dumps([{field: d} for d in docs]))
    return write(path, "\n".join(docs) + "\n")


def fineweb(path, tmp_path, **cfg):
    cfg = {"name": "fineweb", "path": path, "seq_length": 16, "val_fraction": 0.25,
           "cache_dir": str(tmp_path / "cache"), **cfg}
    return load_task(cfg)


def all_chunks(task, split, tokenizer):
    return [b.target for b in task.dataset(split, tokenizer, "text")]


def test_chunk_documents_rules():
    docs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    assert chunk_documents(docs, seq_length=4, eos=0, pack=True) == [
        [1, 2, 3, 4], [5, 0, 6, 7], [0, 8, 9, 10]]  # the last EOS is a partial chunk: dropped
    assert chunk_documents(docs, seq_length=4, eos=0, prefix=[99], pack=False,
                           min_chunk_tokens=2) == [[99, 1, 2, 3], [4, 5, 0], [99, 6, 7, 0],
                                                   [99, 8, 9, 10]]
    # Pieces of one document (blocks of a text file): prefix at its start, EOS at its end only.
    assert chunk_documents(docs[:2], seq_length=10, eos=0, prefix=[99], pack=False,
                           doc_start=[True, False], doc_end=[False, True]) == [
        [99, 1, 2, 3, 4, 5], [6, 7, 0]]


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.json", "docs.parquet"])
def test_record_formats(tmp_path, tokenizer, name):
    path = write_docs(tmp_path / name)
    task = fineweb(str(path), tmp_path, pack=False, min_chunk_tokens=1, val_fraction=0.0)
    chunks = all_chunks(task, "train", tokenizer)
    assert all(1 <= len(c) <= 16 for c in chunks)
    # Unpacked chunks of each document, joined, give back exactly the document + EOS.
    eos = tokenizer.eos_token_id
    flat = [t for c in chunks for t in c]
    texts = tokenizer.decode(flat).split(tokenizer.eos_token)
    assert texts == DOCS + [""] and flat.count(eos) == len(DOCS)
    assert sorted(task.texts("train")) == sorted(DOCS)


def test_packing_makes_full_chunks(tmp_path, tokenizer):
    task = fineweb(str(write_docs(tmp_path / "d.jsonl")), tmp_path, val_fraction=0.0)
    chunks = all_chunks(task, "train", tokenizer)
    assert chunks and all(len(c) == 16 for c in chunks)
    n_tokens = sum(len(x) + 1 for x in tokenizer(DOCS)["input_ids"])
    assert len(chunks) == n_tokens // 16


def test_text_field_is_configurable(tmp_path, tokenizer):
    path = write_docs(tmp_path / "d.parquet", field="content")
    task = fineweb(str(path), tmp_path, text_field="content", val_fraction=0.0)
    assert sorted(task.texts("train")) == sorted(DOCS)


def test_plain_text_and_lists_of_globs(tmp_path, tokenizer):
    (tmp_path / "a").mkdir()
    write_docs(tmp_path / "a" / "one.jsonl.gz")
    write(tmp_path / "a" / "book.txt.gz", "Line one of the book.\nLine two.\n\nLine three.\n")
    write(tmp_path / "b.txt", "Another plain text file.\n")
    task = fineweb([str(tmp_path / "a" / "*.gz"), str(tmp_path / "b.txt")], tmp_path,
                   val_fraction=0.0)
    texts = list(task.texts("train"))
    assert "Line one of the book.\nLine two.\n\nLine three.\n" in texts  # a text file is one doc
    assert "Another plain text file.\n" in texts and len(texts) == len(DOCS) + 2
    # A directory works too.
    assert len(list(fineweb(str(tmp_path / "a"), tmp_path, val_fraction=0.0).texts())) == \
        len(DOCS) + 1


def test_validation_slice_is_held_out_and_stable(tmp_path, tokenizer):
    docs = [f"doc {i} " * 5 for i in range(200)]
    path = write_docs(tmp_path / "d.jsonl", docs)
    task = fineweb(str(path), tmp_path)
    train, val = set(task.texts("train")), set(task.texts("validation"))
    assert not train & val and len(train | val) == 200 and 25 <= len(val) <= 75
    # The same documents are held out in another file order, in streaming mode and for any seed.
    shuffled = write_docs(tmp_path / "e.jsonl", docs[::-1])
    assert set(fineweb(str(shuffled), tmp_path, streaming=True, seed=3).texts("validation")) == val
    with pytest.raises(ValueError, match="split"):
        task.dataset("test", tokenizer, "text")


def test_streaming_matches_in_memory(tmp_path, tokenizer):
    path = str(write_docs(tmp_path / "d.jsonl.gz"))
    table = fineweb(path, tmp_path, streaming=False).dataset("train", tokenizer, "text")
    stream = fineweb(path, tmp_path, streaming=True, shuffle_buffer=64, seed=1).dataset(
        "train", tokenizer, "text")
    a = [b.target for b in table]
    b = [x.target for x in stream]
    assert sorted(a) == sorted(b) and a != b  # same chunks; the stream is shuffled
    assert b == [x.target for x in fineweb(path, tmp_path, streaming=True, shuffle_buffer=64,
                                           seed=1).dataset("train", tokenizer, "text")]


def test_items_feed_the_collator(tmp_path, tokenizer):
    ds = fineweb(str(write_docs(tmp_path / "d.jsonl")), tmp_path, val_fraction=0.0).dataset(
        "train", tokenizer, "text")
    assert isinstance(ds[0], Branch) and ds[0].prompt == []
    layout = ColumnarCollator(branches_per_sample=3)([ds[i] for i in range(6)])
    assert layout.input_ids.shape[0] == 2 and layout.num_branches.tolist() == [3, 3]


def test_max_docs(tmp_path):
    task = fineweb(str(write_docs(tmp_path / "d.jsonl")), tmp_path, max_docs=3, val_fraction=0.0)
    assert list(task.texts()) == DOCS[:3]


# --- the real files (only with PARADEC_DATA_DIR) --------------------------------------------------

DATA_DIR = os.environ.get("PARADEC_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="PARADEC_DATA_DIR is not set")


@needs_data
def test_real_fineweb_sample_loads(tmp_path, tokenizer):
    path = Path(DATA_DIR) / "text" / "fineweb-edu-sample-150docs.jsonl.gz"
    task = fineweb(str(path), tmp_path, seq_length=256, val_fraction=0.1)
    train, val = list(task.texts("train")), list(task.texts("validation"))
    assert len(train) + len(val) == 150 and val
    chunks = task.dataset("train", tokenizer, "text")
    assert len(chunks) > 150 and all(len(chunks[i].target) == 256 for i in range(10))


@needs_data
def test_real_fineweb_plus_wikitext(tmp_path, tokenizer):
    text = Path(DATA_DIR) / "text"
    task = fineweb([str(text / "fineweb-edu-*.jsonl.gz"), str(text / "wikitext-2-raw-test.txt.gz")],
                   tmp_path, seq_length=256, val_fraction=0.05, streaming=True)
    chunks = task.dataset("train", tokenizer, "text")
    n = sum(1 for _ in chunks)
    assert n > 1000  # 411 K characters of FineWeb-Edu + 1.29 MB of WikiText
