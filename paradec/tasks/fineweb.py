"""data=fineweb: plain-text pretraining data, cut into fixed-length chunks, one chunk per branch.

Invariant: every item of a text dataset is ``Branch(prompt=[], target=chunk)`` with
``1 <= len(chunk) <= seq_length``; the collator groups consecutive items into samples. A document
is ``[BOS if the tokenizer adds one] + tokens + [EOS]``. With ``pack=true`` documents are
concatenated and cut into chunks of exactly ``seq_length`` tokens (the remainder of each
tokenisation batch is dropped); with ``pack=false`` a chunk never crosses a document end and a
document's last piece is kept if it has at least ``min(min_chunk_tokens, seq_length)`` tokens.
The validation split is a held-out slice chosen by a hash of each document's text
(``val_fraction`` of them), so it is the same in streaming and in-memory mode, for every seed and
file order, and never overlaps train.

Sources: the Hub (``HuggingFaceFW/fineweb-edu``, config ``sample-10BT``) through ``datasets``,
streamed or downloaded; or local files (``data.path``: JSON lines, JSON, Parquet or plain text,
gzipped or not; a glob, a directory, or a list of them). Local files become a cached ``datasets``
table (re-read when a file changes); tokenisation is a batched, cached ``datasets.map``. A
plain-text file is one document, read in blocks of lines (BOS before the first, EOS after the last).

Tokenising and chunking are :mod:`paradec.tasks.text`'s, shared with the other tasks' ``kind="text"``
datasets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .io import (
    DataError,
    check_kind,
    check_split,
    expand_paths,
    file_format,
    fingerprint,
    iter_records,
    iter_text_blocks,
    record_field,
    stable_fraction,
)
from .text import Chunker, StreamingTextChunks, TextChunks

log = logging.getLogger(__name__)

TEXT_BLOCK_CHARS = 16_384  # plain-text files are read in blocks of about this many characters
MAP_BATCH_SIZE = 256  # documents per tokenisation batch


@dataclass
class FinewebDataConfig:
    """Schema of ``conf/data/fineweb.yaml`` (every key, its default and its meaning)."""

    name: str = "fineweb"
    path: Optional[Any] = None  # local files: .jsonl/.json/.parquet/plain text, gzipped or not; a glob, a directory or a list; null = the Hub
    hub_id: str = "HuggingFaceFW/fineweb-edu"
    hub_config: Optional[str] = "sample-10BT"
    hub_split: str = "train"
    streaming: Optional[bool] = None  # null: stream from the Hub, read local files into a cached table; true/false to force
    text_field: str = "text"  # record field (JSON) or column (Parquet) holding the text; plain-text files are one document each
    seq_length: int = 512  # tokens per chunk (= per branch)
    pack: bool = True  # true: documents joined with EOS and cut into full chunks; false: chunks never cross a document end
    min_chunk_tokens: int = 32  # pack=false: keep a document's last piece only if it has at least this many tokens
    val_fraction: float = 0.01  # documents held out for validation, chosen by a hash of their text (same in every mode and seed)
    max_docs: Optional[int] = None  # read only the first N documents (quick runs)
    shuffle_buffer: int = 10_000  # streaming: seeded shuffle buffer of chunks (0 = off); in-memory data is shuffled by the loader
    seed: int = 0  # seed of the shuffle buffer
    num_proc: Optional[int] = None  # processes for tokenising in-memory data
    cache_dir: Optional[str] = None  # datasets cache (null = HF_DATASETS_CACHE)

    def validate(self) -> "FinewebDataConfig":
        if self.seq_length < 1:
            raise ValueError(f"data.seq_length must be >= 1, got {self.seq_length}")
        if self.min_chunk_tokens < 1:
            raise ValueError(f"data.min_chunk_tokens must be >= 1, got {self.min_chunk_tokens}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"data.max_docs must be >= 1 or null, got {self.max_docs}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0 (0 = off), "
                             f"got {self.shuffle_buffer}")
        return self


# --- reading documents ----------------------------------------------------------------------------

def _local_documents(sources: list[str], text_field: str) -> Iterator[dict]:
    """Generator for ``datasets``: the documents of local files (``sources`` from ``fingerprint``).

    Each record is ``{"text", "doc_start", "doc_end"}``; a plain-text file yields its blocks.
    """
    for source in sources:
        path = Path(source.rsplit("|", 2)[0])
        if file_format(path) == "text":
            blocks = iter_text_blocks(path, TEXT_BLOCK_CHARS)
            previous = next(blocks)
            first = True
            for block in blocks:
                yield {"text": previous, "doc_start": first, "doc_end": False}
                previous, first = block, False
            yield {"text": previous, "doc_start": first, "doc_end": True}
        else:
            for where, record in iter_records(path, columns=[text_field]):
                text = record_field(record, text_field, path, where)
                if text:
                    yield {"text": text, "doc_start": True, "doc_end": True}


def _check_first_record(path: Path, text_field: str) -> None:
    """Cheap eager check for streaming mode: the file opens and its first record is usable."""
    next(_local_documents(fingerprint([path]), text_field), None)


class _SplitFilter:
    """``datasets.filter`` function (batched): keep the documents of one split (picklable)."""

    def __init__(self, val_fraction: float, validation: bool):
        self.val_fraction, self.validation = val_fraction, validation

    def __call__(self, batch: dict) -> list[bool]:
        return [(stable_fraction(t) < self.val_fraction) == self.validation for t in batch["text"]]


def load_hub_documents(hub_id: str, hub_config: str | None, split: str, text_field: str,
                       streaming: bool, cache_dir: str | None):
    """A Hub dataset as documents with a ``text`` column; DataError with one line on failure."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, hub_config, split=split, streaming=streaming,
                                   cache_dir=cache_dir)
    except Exception as err:  # offline, missing dataset, bad config: one line for the user
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(hub_id, f"cannot load from the Hub ({type(err).__name__}: {cause}); "
                                "set data.path= to read local files instead") from err
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise DataError(hub_id, f"no {text_field!r} column (columns: {', '.join(columns)}); "
                                "set data.text_field")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


class FinewebTask:
    """Pretraining text from the Hub or local files (see the module docstring)."""

    kinds = ("text",)
    splits = ("train", "validation")

    def __init__(self, config: FinewebDataConfig):
        import datasets

        self.config = cfg = config.validate()
        self.streaming = cfg.streaming if cfg.streaming is not None else cfg.path is None
        if cfg.path is None:
            self.source = f"{cfg.hub_id} ({cfg.hub_config or 'default'}, {cfg.hub_split})"
            docs = load_hub_documents(cfg.hub_id, cfg.hub_config, cfg.hub_split, cfg.text_field,
                                      self.streaming, cfg.cache_dir)
        else:
            files = expand_paths(cfg.path)
            self.source = str(files[0]) if len(files) == 1 else f"{len(files)} files"
            gen_kwargs = {"sources": fingerprint(files), "text_field": cfg.text_field}
            features = datasets.Features({"text": datasets.Value("string"),
                                          "doc_start": datasets.Value("bool"),
                                          "doc_end": datasets.Value("bool")})
            if self.streaming:
                for f in files:
                    _check_first_record(f, cfg.text_field)
                docs = datasets.IterableDataset.from_generator(
                    _local_documents, features=features, gen_kwargs=gen_kwargs)
            else:
                try:
                    docs = datasets.Dataset.from_generator(
                        _local_documents, features=features, gen_kwargs=gen_kwargs,
                        cache_dir=cfg.cache_dir)
                except datasets.exceptions.DatasetGenerationError as err:
                    cause = err.__cause__ or err.__context__
                    if isinstance(cause, DataError):
                        raise cause from None
                    raise
        if cfg.max_docs is not None:
            docs = docs.take(cfg.max_docs) if self.streaming else docs.select(
                range(min(cfg.max_docs, len(docs))))
        self.documents = docs
        if not self.streaming:
            log.info("data=fineweb: %d documents from %s", len(docs), self.source)

    def _split_documents(self, split: str):
        check_split(split, self.splits)
        fn = _SplitFilter(self.config.val_fraction, validation=split == "validation")
        kwargs = {} if self.streaming else {"num_proc": self.config.num_proc,
                                            "desc": f"fineweb {split} slice"}
        docs = self.documents.filter(fn, batched=True, batch_size=1000, **kwargs)
        if not self.streaming and len(docs) == 0:
            raise DataError(self.source, f"the {split} split is empty ({len(self.documents)} docs, "
                                         f"data.val_fraction={self.config.val_fraction})")
        return docs

    def texts(self, split: str = "train") -> Iterator[str]:
        """Raw text of the split's documents (for training a tokenizer)."""
        for row in self._split_documents(split):
            yield row["text"]

    def dataset(self, split: str, tokenizer, kind: str = "text",
                branches_per_sample: int | None = None):
        """Chunks of ``seq_length`` tokens as branches (the collator groups them into samples,
        so ``branches_per_sample`` is not used here)."""
        check_kind(kind, self.kinds, "fineweb")
        cfg = self.config
        docs = self._split_documents(split)
        chunker = Chunker(tokenizer, cfg.seq_length, cfg.pack, cfg.min_chunk_tokens)
        columns = docs.column_names or ["text"]
        if self.streaming:
            chunks = docs.map(chunker, batched=True, batch_size=MAP_BATCH_SIZE,
                              remove_columns=columns)
            if split == "train" and cfg.shuffle_buffer > 0:
                chunks = chunks.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
            log.info("data=fineweb %s: streaming %s, chunks of %d tokens", split, self.source,
                     cfg.seq_length)
            return StreamingTextChunks(chunks)
        chunks = docs.map(chunker, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=columns,
                          num_proc=cfg.num_proc, desc=f"tokenising fineweb {split}")
        if len(chunks) == 0:
            raise DataError(self.source, f"the {split} split has no chunks of >= "
                                         f"{cfg.min_chunk_tokens} tokens")
        log.info("data=fineweb %s: %d documents -> %d chunks of <= %d tokens", split, len(docs),
                 len(chunks), cfg.seq_length)
        return TextChunks(chunks)
