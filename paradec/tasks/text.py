"""Text into tokens and tokens into chunks: the pipeline of every task's ``kind="text"`` data.

Invariant: a document is ``[the tokenizer's special prefix, e.g. BOS] + tokens + [EOS]``; with
``pack=true`` documents are concatenated and cut into chunks of exactly ``seq_length`` tokens
(the remainder is dropped), with ``pack=false`` a chunk never crosses a document end and a
document's last piece is kept if it has at least ``min(min_chunk_tokens, seq_length)`` tokens.
Every item of a text dataset is ``Branch(prompt=[], target=chunk)``.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np
import torch

from ..layout import Branch


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text by default (e.g. Llama's BOS; none for GPT-2)."""
    cached = getattr(tokenizer, "_paradec_prefix", None)
    if cached is None:
        cached = _special_prefix(tokenizer)
        try:
            tokenizer._paradec_prefix = cached
        except AttributeError:  # a tokenizer that refuses attributes: recompute each time
            pass
    return list(cached)


def _special_prefix(tokenizer) -> list[int]:
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:] == plain else []


def tokenize(tokenizer, texts: list[str], offsets: bool = False):
    """Token ids of ``texts`` without special tokens (and character offsets, if asked), in one
    batched call. Uses the Rust tokenizer directly when it can (several times faster than the
    ``transformers`` wrapper for short texts), else the wrapper.

    Returns ``ids`` or ``(ids, offsets)``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        if offsets:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encodings], [e.offsets for e in encodings]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; paradec needs one to end targets")
    return int(tokenizer.eos_token_id)


def chunk_documents(
    token_lists: Sequence[list[int]],
    *,
    seq_length: int,
    eos: int,
    prefix: Sequence[int] = (),
    pack: bool = True,
    min_chunk_tokens: int = 1,
    doc_start: Sequence[bool] | None = None,
    doc_end: Sequence[bool] | None = None,
) -> list[list[int]]:
    """Cut tokenised documents into chunks (see the module docstring for the rules).

    ``doc_start`` / ``doc_end`` (default: all True) mark pieces of one long document, e.g. the
    blocks of a text file: ``prefix`` goes before a start, ``eos`` after an end.
    """
    n = len(token_lists)
    starts = doc_start if doc_start is not None else itertools.repeat(True, n)
    ends = doc_end if doc_end is not None else itertools.repeat(True, n)
    prefix, tail = list(prefix), [eos]
    docs = [(prefix if s else []) + ids + (tail if e else [])
            for ids, s, e in zip(token_lists, starts, ends)]
    if pack:
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64)
        full = len(flat) // seq_length
        return flat[: full * seq_length].reshape(full, seq_length).tolist()
    need = min(min_chunk_tokens, seq_length)  # a full chunk is always kept
    return [doc[i: i + seq_length] for doc in docs for i in range(0, len(doc), seq_length)
            if min(len(doc) - i, seq_length) >= need]


class Chunker:
    """``datasets.map`` function (batched): ``{"text", ["doc_start", "doc_end"]}`` -> ``input_ids``.

    A picklable object so ``datasets`` can fingerprint it (and cache the result) and run it in
    worker processes.
    """

    def __init__(self, tokenizer, seq_length: int, pack: bool, min_chunk_tokens: int):
        self.tokenizer = tokenizer
        self.kwargs = dict(seq_length=seq_length, eos=eos_id(tokenizer),
                           prefix=special_prefix(tokenizer), pack=pack,
                           min_chunk_tokens=min_chunk_tokens)

    def __call__(self, batch: dict) -> dict:
        ids = tokenize(self.tokenizer, batch["text"])
        return {"input_ids": chunk_documents(ids, doc_start=batch.get("doc_start"),
                                             doc_end=batch.get("doc_end"), **self.kwargs)}


class TextChunks(torch.utils.data.Dataset):
    """Map-style dataset of chunks -> ``Branch(prompt=[], target=chunk)``.

    ``chunks`` is a list of token lists or a ``datasets.Dataset`` with an ``input_ids`` column.
    """

    kind = "text"

    def __init__(self, chunks):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> Branch:
        item = self.chunks[i]
        ids = item["input_ids"] if isinstance(item, dict) else item
        return Branch(prompt=[], target=list(ids))


class StreamingTextChunks(torch.utils.data.IterableDataset):
    """Iterable dataset over a streamed ``datasets.IterableDataset`` of chunks -> ``Branch``.

    Iteration inside DataLoader workers is sharded by ``datasets`` itself. ``set_epoch`` reseeds
    the shuffle buffer, as in ``datasets``.
    """

    kind = "text"

    def __init__(self, stream):
        self.stream = stream

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[Branch]:
        for row in self.stream:
            yield Branch(prompt=[], target=row["input_ids"])
