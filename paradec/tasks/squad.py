"""data=squad: the questions that share a context become the branches of one sample.

Invariants:
  * The context is the background; each question is a branch whose prompt is
    ``template.question`` and whose target is ``template.answer`` (the first gold answer, or
    ``data.unanswerable`` for a SQuAD 2.0 unanswerable question) followed by EOS.
  * No question is dropped for lack of room: a context with more than ``branches_per_sample``
    questions yields several samples with the same context. A question is left out only when its
    training answer is unusable (``answer_start`` does not match the context, or the answer is
    longer than the budget), and that is counted and logged.
  * Training contexts longer than ``max_context_tokens`` are cut to a window around the answers of
    the sample's questions (questions whose answers lie far apart go to different samples), counted
    and logged. Evaluation never uses the answers to place a window: over-long contexts are kept
    whole, cut at the head, or rejected (``eval_overflow``), and the count is logged and in
    ``meta["truncated"]``.
  * Every sample carries ``meta``: ``context_id``, ``ids``, ``questions``, ``answers`` (all gold
    answers per question), ``impossible`` and ``truncated``, which evaluation writes out.

Sources: the Hub (``rajpurkar/squad``, ``rajpurkar/squad_v2``) or local files in the official SQuAD
JSON format (v1.1, v2.0; ``.json`` or ``.json.gz``) or the Hub's row format (``.parquet``,
``.jsonl``). The QA encoding is :mod:`paradec.tasks.qa`'s, shared with data=synthetic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .io import (
    DataError,
    check_kind,
    check_split,
    expand_paths,
    file_format,
    iter_records,
    read_json,
    stable_fraction,
)
from .qa import Context, QADataset, QATemplate, Question, encode_qa
from .text import TextChunks, chunk_documents, eos_id, special_prefix, tokenize

log = logging.getLogger(__name__)

EVAL_OVERFLOW = ("keep", "truncate", "error")


@dataclass
class SquadDataConfig:
    """Schema of ``conf/data/squad.yaml`` (every key, its default and its meaning)."""

    name: str = "squad"
    path: Optional[str] = None  # training file: official SQuAD JSON (.json/.json.gz) or Hub rows (.jsonl/.parquet); a glob or list works; null = the Hub
    eval_path: Optional[str] = None  # split=validation file; null = the Hub's validation split, or (with path set) a held-out slice of path
    test_path: Optional[str] = None  # split=test file (SQuAD's own test set is hidden)
    hub_id: str = "rajpurkar/squad"  # rajpurkar/squad_v2 for SQuAD 2.0
    hub_config: Optional[str] = None
    val_fraction: float = 0.05  # with path set and eval_path null: fraction of articles (by title hash) held out for validation
    max_context_tokens: Optional[int] = 512  # background budget; training cuts longer contexts around the answers (counted and logged)
    eval_overflow: str = "keep"  # evaluation, context over budget: keep (whole, warned), truncate (head, meta.truncated), error
    min_questions: int = 1  # leave out contexts with fewer questions
    max_contexts: Optional[int] = None  # use only the first N contexts of each split (quick runs)
    unanswerable: str = "unanswerable"  # SQuAD 2.0: target text of an unanswerable question
    seq_length: int = 256  # kind=text only: contexts as text chunks of this many tokens
    template: QATemplate = field(default_factory=QATemplate)  # the answer target is template.answer + EOS
    cache_dir: Optional[str] = None  # datasets cache for Hub downloads (null = HF_DATASETS_CACHE)

    def validate(self) -> "SquadDataConfig":
        if self.max_context_tokens is not None and self.max_context_tokens < 8:
            raise ValueError(f"data.max_context_tokens must be >= 8 or null, "
                             f"got {self.max_context_tokens}")
        if self.eval_overflow not in EVAL_OVERFLOW:
            raise ValueError(f"data.eval_overflow must be one of {list(EVAL_OVERFLOW)}, "
                             f"got {self.eval_overflow!r}")
        if self.min_questions < 1:
            raise ValueError(f"data.min_questions must be >= 1, got {self.min_questions}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_contexts is not None and self.max_contexts < 1:
            raise ValueError(f"data.max_contexts must be >= 1 or null, got {self.max_contexts}")
        if self.seq_length < 1:
            raise ValueError(f"data.seq_length must be >= 1, got {self.seq_length}")
        self.template.validate()
        return self


# --- reading --------------------------------------------------------------------------------------

def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` if it exists and has type ``kind``, else a DataError naming ``where``."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(where, f"missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(where, f"{key!r} is {type(value).__name__}, expected {names}")
    return value


def _parse_official(doc: dict, path: Path) -> list[Context]:
    """The official SQuAD JSON: ``{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}``."""
    contexts = []
    for i, article in enumerate(doc["data"]):
        where = f"{path}: data[{i}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for j, para in enumerate(_require(article, "paragraphs", list, where)):
            pwhere = f"{where}.paragraphs[{j}]"
            text = _require(para, "context", str, pwhere)
            questions = []
            for k, qa in enumerate(_require(para, "qas", list, pwhere)):
                qwhere = f"{pwhere}.qas[{k}]"
                qid = str(_require(qa, "id", (str, int), qwhere))
                qwhere = f"{qwhere} (id {qid})"
                impossible = bool(qa.get("is_impossible", False))
                answers = qa.get("answers", []) if impossible else _require(qa, "answers", list,
                                                                            qwhere)
                if not impossible and not answers:
                    raise DataError(qwhere, "no answers (and not marked is_impossible)")
                texts, starts = [], []
                for a, ans in enumerate(answers):
                    texts.append(_require(ans, "text", str, f"{qwhere}.answers[{a}]"))
                    starts.append(int(_require(ans, "answer_start", int, f"{qwhere}.answers[{a}]")))
                questions.append(Question(qid, _require(qa, "question", str, qwhere),
                                          [] if impossible else texts,
                                          [] if impossible else starts, impossible))
            contexts.append(Context(f"{title}#{j}" if title else f"{i}#{j}", title, text,
                                    questions))
    return contexts


def rows_to_contexts(rows, source: str) -> list[Context]:
    """Hub row format (``id, title, context, question, answers{text, answer_start}``) grouped by
    context, in order of first appearance. ``rows`` yields ``(where, row)``."""
    by_key: dict[tuple[str, str], Context] = {}
    per_title: dict[str, int] = {}
    for where, row in rows:
        where = f"{source}: {where}"
        text = _require(row, "context", str, where)
        title = row.get("title", "") or ""
        qid = str(_require(row, "id", (str, int), where))
        answers = _require(row, "answers", (dict, list), f"{where} (id {qid})")
        if isinstance(answers, dict):  # the Hub's columnar form
            texts, starts = list(answers.get("text", [])), list(answers.get("answer_start", []))
        else:
            texts = [a.get("text") for a in answers]
            starts = [a.get("answer_start", -1) for a in answers]
        if not all(isinstance(t, str) for t in texts) or len(starts) != len(texts):
            raise DataError(f"{where} (id {qid})", "malformed 'answers'")
        key = (title, text)
        if key not in by_key:
            n = per_title.get(title, 0)
            per_title[title] = n + 1
            by_key[key] = Context(f"{title}#{n}", title, text, [])
        by_key[key].questions.append(Question(qid, _require(row, "question", str, where), texts,
                                              [int(s) for s in starts], impossible=not texts))
    return list(by_key.values())


def read_squad_file(path: Path) -> list[Context]:
    """Contexts of one local file (official JSON, or rows as JSON / JSON lines / Parquet)."""
    fmt = file_format(path)
    if fmt == "json":
        doc = read_json(path)
        if isinstance(doc, dict):
            if not isinstance(doc.get("data"), list):
                keys = ", ".join(list(doc)[:8]) or "none"
                raise DataError(path, f"not SQuAD JSON: no 'data' list (top-level keys: {keys})")
            contexts = _parse_official(doc, path)
        elif isinstance(doc, list) and doc:
            contexts = rows_to_contexts(((f"record {i}", r) for i, r in enumerate(doc)), str(path))
        else:
            raise DataError(path, "not SQuAD JSON: expected {'data': [...]} or a list of rows")
    elif fmt in ("jsonl", "parquet"):
        contexts = rows_to_contexts(iter_records(path), str(path))
    else:
        raise DataError(path, "unknown SQuAD file type (use .json, .jsonl or .parquet, "
                              "optionally .gz)")
    if not contexts or not any(c.questions for c in contexts):
        raise DataError(path, "no questions in this SQuAD file")
    return contexts


def load_squad_hub(hub_id: str, hub_config: str | None, split: str, cache_dir: str | None):
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, hub_config, split=split, cache_dir=cache_dir)
    except Exception as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(hub_id, f"cannot load split {split!r} from the Hub ({type(err).__name__}:"
                                f" {cause}); set data.path= / data.eval_path= to local files"
                        ) from err
    return rows_to_contexts(((f"row {i}", r) for i, r in enumerate(ds)), f"{hub_id}[{split}]")


def check_answers(contexts: list[Context], source: str,
                  training: bool) -> tuple[list[Context], int]:
    """Check every ``answer_start`` against its context.

    Training: a question whose first answer does not match is dropped (returned count);
    evaluation: any mismatch is a DataError naming the question.
    """
    skipped = 0
    for ctx in contexts:
        kept = []
        for q in ctx.questions:
            bad = [a for a, (t, s) in enumerate(zip(q.answers, q.answer_starts))
                   if ctx.context[s: s + len(t)] != t]
            if training and bad and bad[0] == 0:
                skipped += 1
                continue
            if not training and bad:
                a = bad[0]
                raise DataError(f"{source}: question {q.id}",
                                f"answer {q.answers[a]!r} not found at answer_start "
                                f"{q.answer_starts[a]} of context {ctx.id}")
            kept.append(q)
        ctx.questions = kept
    return contexts, skipped


# --- the task -------------------------------------------------------------------------------------

class SquadTask:
    """SQuAD v1.1 / v2.0 from the Hub or local files (see the module docstring)."""

    kinds = ("qa", "text")

    def __init__(self, config: SquadDataConfig):
        self.config = config.validate()
        self._contexts: dict[str, tuple[list[Context], str]] = {}
        self._files: dict[Path, list[Context]] = {}

    def _read_files(self, spec: Any, key: str) -> tuple[list[Context], str]:
        """The contexts of the files named by ``spec``; a file read for one split is reused."""
        files = expand_paths(spec, key)
        contexts = []
        for f in files:
            if f not in self._files:
                self._files[f] = read_squad_file(f)
            contexts += self._files[f]
        return contexts, str(files[0]) if len(files) == 1 else f"{spec} ({len(files)} files)"

    def _read(self, split: str) -> tuple[list[Context], str]:
        """The raw contexts of a split and a name for them (read once, then kept).

        train: ``path`` (or the Hub); validation: ``eval_path``, else a held-out slice of
        ``path``'s articles, else the Hub; test: ``test_path`` only.
        """
        check_split(split)
        if split in self._contexts:
            return self._contexts[split]
        cfg = self.config
        held_out = None  # True / False: keep the held-out / the other articles of data.path
        if split == "train" and cfg.path is not None:
            contexts, source = self._read_files(cfg.path, "data.path")
            held_out = False if cfg.eval_path is None else None
        elif split == "validation" and cfg.eval_path is not None:
            contexts, source = self._read_files(cfg.eval_path, "data.eval_path")
        elif split == "validation" and cfg.path is not None:
            contexts, source = self._read_files(cfg.path, "data.path")
            held_out = True
        elif split == "test":
            if cfg.test_path is None:
                raise DataError("data.test_path", "data=squad has no test split unless data."
                                                  "test_path is set (SQuAD's test set is hidden)")
            contexts, source = self._read_files(cfg.test_path, "data.test_path")
        else:
            contexts = load_squad_hub(cfg.hub_id, cfg.hub_config, split, cfg.cache_dir)
            source = f"{cfg.hub_id}[{split}]"
        if held_out is not None:
            # Whole articles (titles) are held out, so validation never shares a context with train.
            contexts = [c for c in contexts
                        if (stable_fraction(c.title or c.id) < cfg.val_fraction) == held_out]
            source = (f"{source} ({'held-out' if held_out else 'training'} slice, "
                      f"data.val_fraction={cfg.val_fraction})")
            if not contexts:
                raise DataError(source, f"the {split} slice is empty; set data.eval_path or "
                                        "change data.val_fraction")
        if cfg.max_contexts is not None:
            contexts = contexts[: cfg.max_contexts]
        self._contexts[split] = (contexts, source)
        return contexts, source

    def texts(self, split: str = "train"):
        """Context texts and questions with answers, in the prompt format (for a tokenizer)."""
        t = self.config.template
        for ctx in self._read(split)[0]:
            yield t.background.format(context=ctx.context, title=ctx.title)
            for q in ctx.questions:
                yield t.question.format(question=q.question) + t.answer.format(
                    answer=q.answers[0] if q.answers else self.config.unanswerable)

    def dataset(self, split: str, tokenizer, kind: str = "qa", branches_per_sample: int = 4):
        """QA samples (``kind="qa"``) or the split's contexts as text chunks (``kind="text"``)."""
        check_kind(kind, self.kinds, "squad")
        cfg = self.config
        raw, source = self._read(split)
        if kind == "text":
            ids = tokenize(tokenizer, [c.context for c in raw])
            chunks = chunk_documents(ids, seq_length=cfg.seq_length, eos=eos_id(tokenizer),
                                     prefix=special_prefix(tokenizer), pack=False)
            log.info("data=squad %s: %d contexts -> %d text chunks", split, len(raw), len(chunks))
            return TextChunks(chunks)
        training = split == "train"
        contexts = [Context(c.id, c.title, c.context, list(c.questions)) for c in raw]
        contexts, mismatched = check_answers(contexts, source, training)
        n_before = len(contexts)
        contexts = [c for c in contexts if len(c.questions) >= cfg.min_questions]
        samples, stats = encode_qa(
            contexts, tokenizer, cfg.template, branches_per_sample=branches_per_sample,
            max_context_tokens=cfg.max_context_tokens, training=training,
            eval_overflow=cfg.eval_overflow, unanswerable=cfg.unanswerable, source=source)
        if not samples:
            raise DataError(source, f"no {split} samples (data.min_questions={cfg.min_questions})")
        stats.skipped_mismatch = mismatched
        log.info("data=squad %s: %s: %d questions over %d contexts -> %d samples of <= %d "
                 "branches (%d contexts with < %d questions left out)", split, source,
                 stats.questions, stats.contexts, stats.samples, branches_per_sample,
                 n_before - len(contexts), cfg.min_questions)
        if mismatched:
            log.warning("data=squad %s: skipped %d questions whose answer_start does not match "
                        "the context", split, mismatched)
        if training and (stats.truncated or stats.skipped_long_answer):
            log.info("data=squad %s: truncated %d contexts to max_context_tokens=%s around their "
                     "answers; skipped %d answers longer than that", split, stats.truncated,
                     cfg.max_context_tokens, stats.skipped_long_answer)
        if not training and stats.over_budget:
            log.warning("data=squad %s: %d of %d contexts exceed max_context_tokens=%s: %s "
                        "(data.eval_overflow)", split, stats.over_budget, stats.contexts,
                        cfg.max_context_tokens,
                        "kept whole" if cfg.eval_overflow == "keep" else "cut at the head")
        return QADataset(samples, stats)
