"""How an unpatched model is asked about a context: one question, or all of them in one prompt.

Invariant: every contender sees the same context and question texts (those of the sample it
answers), and a format used to finetune a contender is built by the same function that builds its
evaluation prompt, so a finetuned control is evaluated exactly as it was trained.

Two prompt styles (``eval.prompt``):
  chat   the tokenizer's own chat template: one user message with the context, the question(s)
         and an instruction to answer with short spans copied from the context (an instruct
         model's best normal use);
  plain  the data task's template, ``context + question`` (what paradec finetunes on).

Two shapes:
  single one question per prompt (the ``baseline`` and ``batched`` modes; ``collator.format=
         single`` trains on it);
  joint  all questions of a sample in one prompt, numbered ``1.`` .. ``K.``, answered in order,
         one numbered line each (the ``joint`` mode; ``collator.format=joint`` trains on it).
         :func:`parse_joint` reads the answers back by number: a missing or unreadable answer is
         empty (it scores 0) and is never shifted onto another question.
"""

from __future__ import annotations

import re
from typing import Sequence

from .layout import Branch, BranchSample

PROMPT_STYLES = ("auto", "chat", "plain")

# Chosen among five wordings on 60 dev questions (README, "Real QA"): SmolLM2-135M-Instruct
# answers in sentences under every one; this one gave the best F1.
SINGLE_INSTRUCTION = ("Reply with only the exact words from the text that answer the question, "
                      "at most five words.")
JOINT_INSTRUCTION = ("Reply to each question with only the exact words from the text that answer "
                     "it, at most five words: one line per question, numbered like the questions, "
                     "and nothing else.")
JOINT_QUESTIONS = "\nQuestions:\n"
JOINT_ANSWERS = "\nAnswers:\n"
# Tokens a joint answer may take beyond its own answer budget: the "\nK. " of its line.
JOINT_LINE_TOKENS = 4

# "1. x", "1) x", "1: x", "A1: x", "Answer 1: x", "**1.** x", "Q1 - x"
_NUMBERED = re.compile(r"^\W*(?:answer|ans|a|q|question)?\s*(\d+)\s*\**\s*[.):\-]\s*\**\s*(.*)$",
                       re.IGNORECASE)


def _text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def sample_texts(sample: BranchSample, tokenizer) -> tuple[str, list[str]]:
    """The context and question texts of a sample (its ``meta`` when the task recorded them,
    else the decoded tokens), so every prompt style asks exactly what the sample holds."""
    context = _text(tokenizer, sample.background).strip()
    questions = sample.meta.get("questions")
    if not questions or len(questions) != len(sample.branches):
        questions = [_text(tokenizer, b.prompt).strip() for b in sample.branches]
    return context, [str(q) for q in questions]


def chat_ids(tokenizer, user_message: str) -> list[int]:
    """Token ids of one user turn through the tokenizer's chat template, ready to generate."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("eval.prompt=chat: the tokenizer has no chat template; use "
                         "eval.prompt=plain")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def single_prompts(sample: BranchSample, tokenizer, style: str) -> list[list[int]]:
    """One prompt per question of ``sample``: ``plain`` = background + the branch's prompt."""
    if style == "plain":
        return [sample.background + b.prompt for b in sample.branches]
    context, questions = sample_texts(sample, tokenizer)
    return [chat_ids(tokenizer, f"Text: {context}\n\nQuestion: {q}\n\n{SINGLE_INSTRUCTION}")
            for q in questions]


def numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


def joint_prompt(sample: BranchSample, tokenizer, style: str) -> list[int]:
    """All questions of ``sample`` in one prompt (``plain``: background + numbered questions)."""
    context, questions = sample_texts(sample, tokenizer)
    if style == "plain":
        tail = JOINT_QUESTIONS + numbered(questions) + JOINT_ANSWERS
        return sample.background + tokenizer(tail, add_special_tokens=False).input_ids
    return chat_ids(tokenizer, f"Text: {context}\n\nQuestions:\n{numbered(questions)}\n\n"
                               f"{JOINT_INSTRUCTION}")


def joint_training_sample(sample: BranchSample, tokenizer, eos_id: int) -> BranchSample:
    """``sample`` in the plain joint format: one branch whose prompt is the numbered questions
    and whose target is the numbered first gold answers, then EOS (what ``joint`` decodes)."""
    _, questions = sample_texts(sample, tokenizer)
    answers = sample.meta.get("answers")
    if not answers or len(answers) != len(sample.branches):
        answers = [[_text(tokenizer, b.target).strip()] for b in sample.branches]
    golds = [a[0] if a else "" for a in answers]
    prompt = tokenizer(JOINT_QUESTIONS + numbered(questions) + JOINT_ANSWERS,
                       add_special_tokens=False).input_ids
    target = tokenizer(numbered(golds), add_special_tokens=False).input_ids + [eos_id]
    return BranchSample(sample.background, [Branch(prompt, target)], dict(sample.meta))


def single_training_samples(sample: BranchSample) -> list[BranchSample]:
    """``sample`` as one plain row per question (the context copied into each)."""
    out = []
    for k, branch in enumerate(sample.branches):
        meta = {key: [value[k]] if isinstance(value, list) and len(value) == len(sample.branches)
                else value for key, value in sample.meta.items()}
        out.append(BranchSample(sample.background, [branch], meta))
    return out


def parse_joint(text: str, n_questions: int) -> list[str]:
    """The answers of a joint reply by their numbers; "" where an answer is missing.

    The first line numbered ``i`` answers question ``i``; lines with other numbers or none are
    ignored. One question and no numbered line: the first non-empty line is its answer.
    """
    answers = [""] * n_questions
    found = [False] * n_questions
    lines = [line.strip() for line in text.splitlines()]
    for line in lines:
        match = _NUMBERED.match(line)
        if match is None:
            continue
        i = int(match.group(1)) - 1
        if 0 <= i < n_questions and not found[i]:
            answers[i], found[i] = match.group(2).strip(), True
    if n_questions == 1 and not found[0]:
        answers[0] = next((line for line in lines if line), "")
    return answers
