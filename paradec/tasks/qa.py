"""Question answering as columns: a context with its questions becomes branch samples.

Invariants (the encoding every QA task uses):
  * The context is the background; each question is a branch whose prompt is
    ``template.question`` and whose target is ``template.answer`` (its first gold answer)
    followed by EOS; evaluation keeps every gold answer in ``meta``.
  * No question is dropped for lack of room: a context with more than ``branches_per_sample``
    questions yields several samples with the same context. A training question is left out only
    when its answer alone exceeds the budget, and that is counted.
  * Training contexts longer than the budget are cut to a window around the answers of the
    sample's questions; evaluation never uses the answers to place a window (see
    :func:`encode_qa`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..layout import Branch, BranchSample
from .io import DataError
from .text import eos_id, special_prefix, tokenize


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
