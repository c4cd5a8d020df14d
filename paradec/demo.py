"""stage=generate: show what the model sees and watch it answer several questions at once.

Invariant: the demo goes through exactly the evaluation path: the data task's QA template and
:func:`paradec.tasks.squad.encode_qa` turn the background and questions into one
:class:`BranchSample`, and :func:`paradec.decoding.decode_columnar` answers them with the
collator's alignment and stride. The printed table is :func:`paradec.layout.build_layout`'s
layout of the prompts, the grid of DESIGN section 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import models
from .decoding import DecodeConfig, decode_columnar, prompts_only
from .layout import BranchSample, Layout, build_layout
from .tasks.squad import Context, QATemplate, Question, encode_qa

log = logging.getLogger(__name__)


def _cell(tokenizer, token_id: int, width: int) -> str:
    text = tokenizer.decode([token_id]).replace("\n", "⏎")
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


def layout_table(layout: Layout, tokenizer, row: int = 0, width: int = 7,
                 max_background: int = 6) -> str:
    """The columns x branches grid of one sample; a long background is shown by its last
    ``max_background`` columns (the rest is summarised in the first line)."""
    column, branch, ids = layout.column[row], layout.branch[row], layout.input_ids[row]
    real = layout.valid[row]
    first_shown = 0
    bg_cols = column[real & (branch == 0)]
    lines = []
    if len(bg_cols) > max_background:
        first_shown = int(bg_cols.max()) - max_background + 1
        lines.append(f"background: columns {int(bg_cols.min())}..{int(bg_cols.max())} "
                     f"({len(bg_cols)} tokens), last {max_background} shown")
    last = int(column[real].max())
    cols = list(range(first_shown, last + 1))
    lines.append("column  | " + " ".join(str(c).ljust(width) for c in cols))
    n_branches = int(layout.num_branches[row])
    for k in range(n_branches + 1):
        cells = {int(c): int(t) for c, t, b, ok in zip(column, ids, branch, real)
                 if ok and int(b) == k}
        name = "bg (0)" if k == 0 else f"br {k}"
        lines.append(f"{name:<7} | " + " ".join(
            _cell(tokenizer, cells[c], width) if c in cells else " " * width for c in cols))
    return "\n".join(lines)


def build_demo_sample(background: str, questions: list[str], tokenizer, template: QATemplate
                      ) -> BranchSample:
    """One sample: the background and one prompt per question, via the data task's template."""
    context = Context(id="demo", title="", context=background, questions=[
        Question(id=f"q{i + 1}", question=q, answers=[], answer_starts=[])
        for i, q in enumerate(questions)])
    samples, _ = encode_qa([context], tokenizer, template, branches_per_sample=len(questions),
                           training=False)
    return prompts_only(samples)[0]  # no gold answers: the targets are what the model writes


def generate_stage(run, run_dir: Path, cfg=None):
    """Print the layout, then each branch's answer as it is decoded, one column at a time."""
    if not (run.model.path or run.model.arch == "hub"):
        raise ValueError("stage=generate needs a trained model: set model.path=<run dir>/model")
    model, tokenizer = models.load_model(run.model)
    if tokenizer is None:
        raise ValueError(f"model.path={run.model.path}: no tokenizer found beside the model")
    model.eval()
    gen, coll = run.generate, run.collator
    template = getattr(run.data, "template", None) or QATemplate()
    sample = build_demo_sample(gen.background, list(gen.questions), tokenizer, template)
    layout = build_layout([sample], align_to=coll.align_to, branch_stride=coll.branch_stride,
                          pad_id=tokenizer.pad_token_id or 0)
    print(layout_table(layout, tokenizer))
    if gen.plot:
        try:
            from .report import plot_layout

            path = Path(run_dir) / "layout.png"
            plot_layout(layout, 0, path, token_text=lambda t: tokenizer.decode([t]))
            print(f"layout picture: {path}")
        except ImportError:
            log.info("paradec.report is not available: no layout picture")
    answers = [[] for _ in gen.questions]

    def show(t: int, token: torch.Tensor, emitted: torch.Tensor) -> None:
        for k in emitted[0].nonzero().flatten().tolist():
            answers[k].append(int(token[0, k]))
        words = [tokenizer.decode(a, skip_special_tokens=True).replace("\n", "⏎") for a in answers]
        print(f"column {int(layout.target_start[0]) + t}: " + " | ".join(
            f"[{k + 1}] {w}" for k, w in enumerate(words)))

    result = decode_columnar(model, [sample], eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id or 0, align_to=coll.align_to,
                             branch_stride=coll.branch_stride,
                             isolate_branches=coll.isolate_branches,
                             cfg=DecodeConfig(max_new_tokens=gen.max_new_tokens), on_step=show)
    print()
    for question, tokens in zip(gen.questions, result.tokens[0]):
        print(f"Q: {question}\nA: {tokenizer.decode(tokens, skip_special_tokens=True).strip()}")
    print(f"\n{len(gen.questions)} answers in {result.forward_calls} forward calls "
          f"({result.wall_s:.2f} s)")
    return {"answers": [tokenizer.decode(t, skip_special_tokens=True).strip()
                        for t in result.tokens[0]], "forward_calls": result.forward_calls}
