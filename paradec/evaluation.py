"""Evaluation: decode every question in each mode, score it, and write what was done.

Invariant: every mode answers exactly the same questions (each id once per mode) with the same
decode settings; ``parallel`` and ``sequential`` use the one columnar decoder with the collator's
alignment and stride (the same as training), ``baseline`` and ``batched`` the unpatched model.
EM / F1 follow the official SQuAD v1.1 script: lower-case, strip punctuation and the articles
a/an/the, collapse whitespace; the max over the gold answers; fractions in [0, 1].
Under several processes each answers whole contexts in every mode and the main process
scores the gathered answers: the same files, and with greedy decoding the same answers, as one
process (:mod:`paradec.sharding`).

Modes (DESIGN section 1):
  parallel    all questions of a context as branches of one sample, one forward per column;
  sequential  the same columnar model, one question per sample (the fair quality control);
  baseline    the unpatched model, one question at a time;
  batched     the unpatched model, all questions of a context as one left-padded batch;
  prefix      the unpatched model, the context prefilled once and its KV cache shared by the
              questions of a sample, decoded as a batch (prefix caching; answers = baseline's);
  joint       the unpatched model, all questions of a sample in one numbered prompt, answered in
              order in one sequence and parsed back by number (:mod:`paradec.prompts`).
The unpatched modes ask in ``eval.prompt`` style: ``chat`` (the tokenizer's chat template),
``plain`` (the data template), or ``auto``: plain for a model paradec finetuned (it was trained
on that format), else chat when the tokenizer has a template.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .config import COLUMNAR_MODES, MODES, DecodeConfig, EvalConfig
from .decoding import DecodeResult, OnStep, decode_columnar, decode_plain, decode_prefix
from .layout import BranchSample
from .prompts import JOINT_LINE_TOKENS, joint_prompt, parse_joint, single_prompts
from .sharding import context_shards, contexts, merge_shards, sample_tokens, split_by_sample

log = logging.getLogger(__name__)


# --- official SQuAD v1.1 scoring ----------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, articles (a/an/the) and extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_score(metric, prediction: str, golds: Sequence[str]) -> float:
    """The max of ``metric`` over the gold answers (0 with no gold answer)."""
    return max((metric(prediction, g) for g in golds), default=0.0)


# --- running the modes --------------------------------------------------------------------------

@dataclass
class EvalQuestion:
    """One question to answer, with where it came from."""

    id: str
    sample: int
    background: list[int]
    prompt: list[int]
    answers: list[str]


def questions_of(samples: Sequence[BranchSample]) -> list[EvalQuestion]:
    out = []
    for s_idx, sample in enumerate(samples):
        ids = sample.meta.get("ids") or [f"{s_idx}-{k}" for k in range(len(sample.branches))]
        answers = sample.meta.get("answers") or [[] for _ in sample.branches]
        for k, branch in enumerate(sample.branches):
            out.append(EvalQuestion(str(ids[k]), s_idx, sample.background, branch.prompt,
                                list(answers[k])))
    return out


def first_contexts(dataset, n: int, stride: int = 1) -> list[BranchSample]:
    """The samples of the first ``n`` contexts (0 = all) among every ``stride``-th context of
    the split (contexts 0, stride, 2 stride, ...: a spread over the whole split). A context with
    more questions than ``collator.branches_per_sample`` spans several samples and counts once,
    so a sweep over branch counts answers the same questions at every K."""
    out, order = [], {}
    for i in range(len(dataset)):
        sample = dataset[i]
        context = sample.meta.get("context_id", i)
        index = order.setdefault(context, len(order))
        if index % stride:
            continue
        if n and index // stride >= n:
            break
        out.append(sample)
    return out


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def prompt_style(requested: str, tokenizer, finetuned_format: str | None) -> str:
    """``eval.prompt`` resolved: ``auto`` is plain for a model paradec finetuned (it learned
    that format), else chat when the tokenizer has a chat template, else plain."""
    if requested != "auto":
        return requested
    if finetuned_format is not None or not getattr(tokenizer, "chat_template", None):
        return "plain"
    return "chat"


def run_mode(mode: str, model, samples: Sequence[BranchSample], *, tokenizer, collator_cfg,
             decode_cfg: DecodeConfig, batch_size: int, prompt: str = "plain",
             progress: bool = True, eos_token_id: int | None = None,
             pad_token_id: int | None = None,
             on_step: OnStep | None = None) -> tuple[list[str], DecodeResult]:
    """Decode every question of ``samples`` in ``mode``: the one dispatch over the modes, for
    evaluation and the speed benchmark alike. Returns the answer texts in :func:`questions_of`
    order and the merged costs. ``prompt`` (chat | plain) is how the unpatched modes ask.

    ``tokenizer=None`` decodes token workloads (``prompt=plain``; a joint prompt is then the
    context and the questions' tokens in a row, with no numbering) with the given
    ``eos_token_id`` / ``pad_token_id`` and returns no texts. ``on_step`` goes to the decoder of
    every unit (:data:`paradec.decoding.OnStep`; ``t`` restarts at 0 with each unit).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
    if tokenizer is None and prompt != "plain":
        raise ValueError(f"mode {mode} with prompt {prompt} needs a tokenizer")
    if tokenizer is not None:
        eos_token_id, pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    eos = eos_token_id
    pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    singles = [BranchSample(s.background, [b]) for s in samples for b in s.branches]
    if mode == "parallel":
        units = [list(group) for group in _batches(samples, batch_size)]
    elif mode == "sequential":
        units = [list(group) for group in _batches(singles, batch_size)]
    elif mode == "baseline":  # one question at a time
        units = [[row] for s in samples for row in single_prompts(s, tokenizer, prompt)]
    elif mode in ("batched", "prefix"):  # a sample's questions per batch, in rows of their own
        units = [single_prompts(s, tokenizer, prompt) for s in samples]
    elif tokenizer is None:  # joint on a token workload: nothing to number the questions with
        units = [[s.background + [t for b in s.branches for t in b.prompt]] for s in samples]
    else:  # joint: one prompt, one sequence per sample
        units = [[joint_prompt(s, tokenizer, prompt)] for s in samples]
    total = DecodeResult(tokens=[])
    answers: list[str] = []
    for i, unit in enumerate(tqdm(units, desc=mode, disable=not progress, dynamic_ncols=True,
                                  leave=False)):
        if mode in COLUMNAR_MODES:
            result = decode_columnar(
                model, unit, eos_token_id=eos, pad_token_id=pad, align_to=collator_cfg.align_to,
                branch_stride=collator_cfg.branch_stride,
                isolate_branches=collator_cfg.isolate_branches, cfg=decode_cfg, on_step=on_step)
        elif mode == "joint":
            n = len(samples[i].branches)
            budget = dataclasses.replace(
                decode_cfg, max_new_tokens=n * (decode_cfg.max_new_tokens + JOINT_LINE_TOKENS))
            result = decode_plain(model, unit, eos_token_id=eos, pad_token_id=pad, cfg=budget,
                                  on_step=on_step)
            if tokenizer is not None:
                answers += parse_joint(answer_text(tokenizer, result.tokens[0][0]), n)
        elif mode == "prefix":
            result = decode_prefix(model, unit, eos_token_id=eos, pad_token_id=pad,
                                   cfg=decode_cfg, on_step=on_step)
        else:
            result = decode_plain(model, unit, eos_token_id=eos, pad_token_id=pad, cfg=decode_cfg,
                                  on_step=on_step)
        if mode != "joint" and tokenizer is not None:
            answers += [answer_text(tokenizer, branch) for sample in result.tokens
                        for branch in sample]
        total.merge(result)
    return answers, total


def attention_bytes(rows: int, length: int, model_config) -> int:
    """A bound on what one forward of ``rows`` sequences of ``length`` tokens allocates for
    attention: the [L, L] mask (bool, and the float copy sdpa makes on CPU), one head's scores
    per query head in the plain kernel, and the KV cache of every layer (fp32)."""
    heads = int(getattr(model_config, "num_attention_heads", 1))
    kv_heads = int(getattr(model_config, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(model_config, "head_dim", None)
                   or model_config.hidden_size // heads)
    layers = int(model_config.num_hidden_layers)
    square = length * length * (1 + 4 + 4 * heads)
    cache = length * 2 * layers * kv_heads * head_dim * 4
    return rows * (square + cache)


def largest_unit(samples: Sequence[BranchSample], mode: str, batch_size: int,
                 max_new_tokens: int) -> tuple[int, int, int]:
    """``(rows, tokens per row, sample index)`` of the largest forward a mode makes, bounded from
    above (every row as long as the longest, decoding included)."""
    best = (0, 0, 0)
    for i, s in enumerate(samples):
        prompts = [len(b.prompt) for b in s.branches]
        k = len(prompts)
        if mode == "parallel":
            unit = (min(batch_size, len(samples)), len(s.background) + sum(prompts)
                    + k * max_new_tokens)
        elif mode == "sequential":
            unit = (batch_size, len(s.background) + max(prompts) + max_new_tokens)
        elif mode == "joint":
            # the questions and their numbering, then K numbered answers (run_mode's budget)
            unit = (1, len(s.background) + 2 * sum(prompts)
                    + k * (max_new_tokens + JOINT_LINE_TOKENS))
        else:  # baseline / batched / prefix: a row per question, the context in each
            rows = 1 if mode == "baseline" else k
            unit = (rows, len(s.background) + max(prompts) + max_new_tokens)
        if unit[0] * unit[1] ** 2 > best[0] * best[1] ** 2:
            best = (*unit, i)
    return best


def check_memory(samples: Sequence[BranchSample], cfg: EvalConfig, model_config) -> None:
    """Refuse, in one line, an evaluation whose largest forward would exceed
    ``eval.memory_budget_gb`` (before anything is allocated)."""
    budget = cfg.memory_budget_gb * 2 ** 30
    for mode in cfg.modes:
        rows, length, index = largest_unit(samples, mode, cfg.batch_size, cfg.max_new_tokens)
        need = attention_bytes(rows, length, model_config)
        if need > budget:
            context = samples[index].meta.get("context_id", index)
            raise ValueError(
                f"eval.memory_budget_gb={cfg.memory_budget_gb:g}: mode {mode} would need about "
                f"{need / 2 ** 30:.1f} GiB for context {context} ({rows} x {length} tokens); cut "
                "long contexts (data.eval_overflow=truncate, data.max_context_tokens), lower "
                "eval.batch_size, or raise the budget")


def answer_text(tokenizer, tokens: list[int]) -> str:
    """Decoded answer text, without EOS and special tokens."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def evaluate(model, tokenizer, samples: Sequence[BranchSample], cfg: EvalConfig, collator_cfg,
             out_dir: Path, tracker=None, progress: bool = True,
             finetuned_format: str | None = None) -> dict | None:
    """Run every mode of ``cfg.modes``; write ``eval.json`` and ``predictions.jsonl``.

    Under several processes (``accelerate launch`` / ``torchrun``) each process answers its
    share of whole contexts in every mode (:mod:`paradec.sharding`) and the main process gathers
    the answers, scores them and writes the same files as one process would, plus what each
    process did (``ranks``). Returns the report on the main process, None on the others.

    ``finetuned_format``: the ``collator.format`` paradec finetuned the model on (None: not
    finetuned by paradec); it decides ``eval.prompt=auto``."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    style = prompt_style(cfg.prompt, tokenizer, finetuned_format)
    shards = context_shards(samples, state.num_processes, cfg.max_new_tokens)
    mine = answer_shard(model, tokenizer, samples, shards[state.process_index], cfg,
                        collator_cfg, style, progress=progress and state.is_main_process)
    mine["rank"] = state.process_index
    shares = gather_object([mine]) if state.num_processes > 1 else [mine]
    if not state.is_main_process:
        return None
    return write_report(tokenizer, samples, shares, cfg, style, out_dir, tracker)


def answer_shard(model, tokenizer, samples: Sequence[BranchSample], indices: list[int],
                 cfg: EvalConfig, collator_cfg, style: str, progress: bool = True) -> dict:
    """This process's share: the samples ``indices`` answered in every mode, with the costs."""
    mine = [samples[i] for i in indices]
    share = {"indices": list(indices), "contexts": len(contexts(mine)),
             "n_questions": sum(len(s.branches) for s in mine),
             "tokens": sum(sample_tokens(s, cfg.max_new_tokens) for s in mine), "modes": {}}
    for mode in cfg.modes:
        answers, result = run_mode(mode, model, mine, tokenizer=tokenizer,
                                   collator_cfg=collator_cfg, decode_cfg=cfg.decode_config(),
                                   batch_size=cfg.batch_size, prompt=style, progress=progress)
        share["modes"][mode] = {
            "answers": split_by_sample(mine, answers), "wall_s": result.wall_s,
            "new_tokens": result.new_tokens, "forward_calls": result.forward_calls,
            "peak_kv_tokens": result.peak_kv_tokens}
    return share


def write_report(tokenizer, samples: Sequence[BranchSample], shares: Sequence[dict],
                 cfg: EvalConfig, style: str, out_dir: Path, tracker=None) -> dict:
    """Score the answers of every process's share; write ``eval.json`` and ``predictions.jsonl``
    and log them. A mode's wall time is its slowest process's, so ``questions_per_s`` is what
    the processes achieved together; counts are summed and the KV peak is the largest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions = questions_of(samples)
    report, records = {}, []
    for mode in cfg.modes:
        runs = [share["modes"][mode] for share in shares]
        answers = merge_shards(len(samples), [(share["indices"], run["answers"])
                                              for share, run in zip(shares, runs)])
        assert len(answers) == len(questions), (mode, len(answers), len(questions))
        em = f1 = 0.0
        for q, text in zip(questions, answers):
            q_em, q_f1 = best_score(exact_match, text, q.answers), best_score(f1_score, text, q.answers)
            em, f1 = em + q_em, f1 + q_f1
            records.append({"id": q.id, "mode": mode, "prediction": text, "answers": q.answers,
                            "sample": q.sample, "prompt_tokens": len(q.prompt), "em": q_em,
                            "f1": q_f1})
        n = max(len(questions), 1)
        wall_s = max(run["wall_s"] for run in runs)
        report[mode] = {
            "em": em / n, "f1": f1 / n, "n_questions": len(questions),
            "wall_s": wall_s, "questions_per_s": len(questions) / max(wall_s, 1e-9),
            "new_tokens": sum(run["new_tokens"] for run in runs),
            "forward_calls": sum(run["forward_calls"] for run in runs),
            "peak_kv_tokens": max(run["peak_kv_tokens"] for run in runs),
            "prompt": "columnar" if mode in COLUMNAR_MODES else style,
            "processes": len(shares),
            "ranks": [{"rank": share["rank"], "contexts": share["contexts"],
                       "n_questions": share["n_questions"], "tokens": share["tokens"],
                       "wall_s": run["wall_s"], "forward_calls": run["forward_calls"]}
                      for share, run in zip(shares, runs)],
        }
        log.info("%s: EM %.3f F1 %.3f, %.1f questions/s", mode, report[mode]["em"],
                 report[mode]["f1"], report[mode]["questions_per_s"])
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    if tracker is not None:
        flat = {f"eval/{mode}/{k}": v for mode, row in report.items() for k, v in row.items()
                if isinstance(v, (int, float))}
        tracker.log(flat)
        tracker.summary(flat)
        by_id = collections.defaultdict(dict)
        for rec in records:
            by_id[rec["id"]][rec["mode"]] = rec["prediction"]
        q_by_id = {q.id: q for q in questions}
        rows = [[qid, tokenizer.decode(q_by_id[qid].prompt, skip_special_tokens=True),
                 " | ".join(q_by_id[qid].answers), *[preds.get(m, "") for m in cfg.modes]]
                for qid, preds in by_id.items()]
        tracker.log_table("eval/predictions", ["id", "question", "gold", *cfg.modes], rows)
    return report


def format_table(report: dict) -> str:
    """The modes side by side, as a markdown table."""
    keys = ["em", "f1", "n_questions", "questions_per_s", "forward_calls", "new_tokens",
            "peak_kv_tokens", "wall_s"]
    lines = ["| metric | " + " | ".join(report) + " |", "|---|" + "---|" * len(report)]
    for key in keys:
        cells = []
        for row in report.values():
            v = row[key]
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
