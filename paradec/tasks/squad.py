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
``.jsonl``). The QA encoding here (:class:`QATemplate`, :func:`encode_qa`) is shared with
data=synthetic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..layout import Branch, BranchSample
from .fineweb import TextChunks, chunk_documents, eos_id, special_prefix, tokenize
from .io import (DataError, check_kind, check_split, expand_paths, file_format, iter_records,
                 read_json, stable_fraction)

log = logging.getLogger(__name__)

EVAL_OVERFLOW = ("keep", "truncate", "error")


@dataclass
class QATemplate:
    """How a context, a question and an answer become text. Keep prompts short."""

    background: str = "{context}"  # may also use {title}
    question: str = "\nQ: {question}\nA:"
    answer: str = " {answer}"

    def validate(self) -> "QATemplate":
        fields = {"background": ("context", "title"), "question": ("question",),
                  "answer": ("answer",)}
        for name, allowed in fields.items():
            value = getattr(self, name)
            try:
                value.format(**{k: "x" for k in allowed})
            except (KeyError, IndexError, ValueError) as err:
                fields_text = ", ".join("{" + k + "}" for k in allowed)
                raise ValueError(f"data.template.{name}: {value!r} may use only {fields_text} "
                                 f"({type(err).__name__}: {err})") from err
        if self.background.count("{context}") != 1:
            raise ValueError(f"data.template.background must contain {{context}} exactly once, "
                             f"got {self.background!r}")
        return self


@dataclass
class Question:
    """One question. ``answers`` are all gold answers (empty only when ``impossible``);
    ``answer_starts`` their character offsets in the context (-1 = unknown)."""

    id: str
    question: str
    answers: list[str]
    answer_starts: list[int]
    impossible: bool = False


@dataclass
class Context:
    """A context (background text) and the questions asked about it."""

    id: str
    title: str
    context: str
    questions: list[Question]


@dataclass
class SquadDataConfig:
    """Schema of ``conf/data/squad.yaml`` (defaults equal the YAML)."""

    name: str = "squad"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    test_path: Optional[str] = None
    hub_id: str = "rajpurkar/squad"
    hub_config: Optional[str] = None
    val_fraction: float = 0.05
    max_context_tokens: Optional[int] = 512
    eval_overflow: str = "keep"
    min_questions: int = 1
    max_contexts: Optional[int] = None
    unanswerable: str = "unanswerable"
    seq_length: int = 256
    template: QATemplate = field(default_factory=QATemplate)
    cache_dir: Optional[str] = None

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
                                f" {cause}); set data.path= / data.eval_path= to local files")
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


# --- encoding (shared with data=synthetic) --------------------------------------------------------

@dataclass
class QAStats:
    """What :func:`encode_qa` did; evaluation reports these."""

    contexts: int = 0
    questions: int = 0
    samples: int = 0
    truncated: int = 0  # contexts cut to the budget
    over_budget: int = 0  # contexts longer than the budget (evaluation)
    skipped_long_answer: int = 0  # training questions whose answer alone exceeds the budget
    skipped_mismatch: int = 0  # training questions whose answer_start does not match


def _answer_span(offsets: np.ndarray, char_start: int, char_end: int) -> tuple[int, int]:
    """Token span [a, b) covering characters [char_start, char_end)."""
    a = int(np.searchsorted(offsets[:, 1], char_start, side="right"))
    b = int(np.searchsorted(offsets[:, 0], char_end, side="left"))
    return a, max(b, a + 1)


def _training_windows(spans: list[tuple[int, int] | None], n: int, budget: int, k: int,
                      stats: QAStats) -> list[tuple[int, list[int]]]:
    """Group the questions of an over-long context into ``(window start, [question index])``.

    ``spans[i]`` is the token span of question i's answer (None: unanswerable). Each group has at
    most ``k`` questions whose answers fit together in ``budget`` tokens; its window is centred on
    them. Unanswerable questions join any group with room, else a window at the head.
    """
    groups: list[list] = []  # [lo, hi, members]: the answers of members lie in [lo, hi)
    for i in sorted((i for i, s in enumerate(spans) if s is not None), key=spans.__getitem__):
        a, b = spans[i]
        if b - a > budget:
            stats.skipped_long_answer += 1
        elif groups and len(groups[-1][2]) < k and max(groups[-1][1], b) - groups[-1][0] <= budget:
            groups[-1][1] = max(groups[-1][1], b)
            groups[-1][2].append(i)
        else:
            groups.append([a, b, [i]])
    windows = [(min(max(lo - (budget - (hi - lo)) // 2, 0), n - budget), members)
               for lo, hi, members in groups]
    for i in (i for i, s in enumerate(spans) if s is None):
        room = next((w for w in windows if len(w[1]) < k), None)
        if room is None:
            room = (0, [])
            windows.append(room)
        room[1].append(i)
    return windows


def encode_qa(
    contexts: Sequence[Context],
    tokenizer,
    template: QATemplate,
    *,
    branches_per_sample: int,
    max_context_tokens: int | None = None,
    training: bool = True,
    eval_overflow: str = "keep",
    unanswerable: str = "unanswerable",
    source: str = "",
) -> tuple[list[BranchSample], QAStats]:
    """Tokenise contexts, questions and answers in batches and group them into samples.

    The budget ``max_context_tokens`` counts background tokens (including a BOS the tokenizer
    adds). See the module docstring for truncation; ``source`` names the data in errors.
    """
    if branches_per_sample < 1:
        raise ValueError(f"branches_per_sample must be >= 1, got {branches_per_sample}")
    stats = QAStats(contexts=len(contexts))
    prefix, eos = special_prefix(tokenizer), eos_id(tokenizer)
    budget = None if max_context_tokens is None else max_context_tokens - len(prefix)
    head = template.background.split("{context}")[0]
    questions = [q for c in contexts for q in c.questions]
    texts = ([template.background.format(context=c.context, title=c.title) for c in contexts]
             + [template.question.format(question=q.question) for q in questions]
             + [template.answer.format(answer=q.answers[0] if q.answers else unanswerable)
                for q in questions])
    want_offsets = training and budget is not None
    ids, offsets = tokenize(tokenizer, texts, offsets=True) if want_offsets else (
        tokenize(tokenizer, texts), None)
    n_ctx, n_q = len(contexts), len(questions)
    bg_ids, prompts, targets = ids[:n_ctx], ids[n_ctx: n_ctx + n_q], ids[n_ctx + n_q:]

    samples: list[BranchSample] = []
    first = 0  # index of the context's first question in the flat lists
    for c_i, ctx in enumerate(contexts):
        bg = bg_ids[c_i]
        qs = list(range(first, first + len(ctx.questions)))
        first += len(ctx.questions)
        n = len(bg)
        if budget is None or n <= budget:
            windows = [(None, qs[i: i + branches_per_sample])
                       for i in range(0, len(qs), branches_per_sample)]
        elif training:
            stats.truncated += 1
            char_offsets = np.asarray(offsets[c_i], dtype=np.int64).reshape(-1, 2)
            shift = len(head.format(title=ctx.title))  # where the context starts in the text
            spans = [None if q.impossible or not q.answers else _answer_span(
                char_offsets, shift + q.answer_starts[0], shift + q.answer_starts[0]
                + len(q.answers[0])) for q in ctx.questions]
            windows = [(w, [qs[i] for i in g]) for w, g in
                       _training_windows(spans, n, budget, branches_per_sample, stats)]
        else:
            stats.over_budget += 1
            if eval_overflow == "error":
                raise DataError(f"{source}: context {ctx.id}",
                                f"{n + len(prefix)} tokens, more than data.max_context_tokens="
                                f"{max_context_tokens} (data.eval_overflow=error)")
            start = 0 if eval_overflow == "truncate" else None
            stats.truncated += eval_overflow == "truncate"
            windows = [(start, qs[i: i + branches_per_sample])
                       for i in range(0, len(qs), branches_per_sample)]
        for start, group in windows:
            if not group:
                continue
            background = prefix + (bg if start is None else bg[start: start + budget])
            samples.append(BranchSample(
                background=background,
                branches=[Branch(prompt=prompts[q], target=targets[q] + [eos]) for q in group],
                meta={"context_id": ctx.id,
                      "ids": [questions[q].id for q in group],
                      "questions": [questions[q].question for q in group],
                      "answers": [questions[q].answers or [unanswerable] for q in group],
                      "impossible": [questions[q].impossible for q in group],
                      "truncated": start is not None}))
            stats.questions += len(group)
    stats.samples = len(samples)
    return samples, stats


class QADataset(torch.utils.data.Dataset):
    """Map-style dataset of ready :class:`BranchSample` objects; ``stats`` says how it was built."""

    kind = "qa"

    def __init__(self, samples: list[BranchSample], stats: QAStats):
        self.samples, self.stats = samples, stats

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> BranchSample:
        return self.samples[i]


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
