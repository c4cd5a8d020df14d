"""stage=generate: show what the model sees and watch it answer several questions at once.

Invariant: the stage goes through exactly the evaluation path: the data task's QA template and
:func:`paradec.tasks.qa.encode_qa` turn the background and questions into one
:class:`BranchSample`, and :func:`paradec.decoding.decode_columnar` answers them with the
collator's alignment and stride. The printed table is :func:`paradec.layout.build_layout`'s
layout of the prompts, the grid of DESIGN section 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import models
from .config import DecodeConfig
from .decoding import decode_columnar, prompts_only
from .layout import BranchSample, build_layout
from .tasks.qa import Context, QATemplate, Question, encode_qa
from .viz import layout_table, plot_layout


def build_sample(background: str, questions: list[str], tokenizer, template: QATemplate
                      ) -> BranchSample:
    """One sample: the background and one prompt per question, via the data task's template."""
    context = Context(id="generate", title="", context=background, questions=[
        Question(id=f"q{i + 1}", question=q, answers=[], answer_starts=[])
        for i, q in enumerate(questions)])
    samples, _ = encode_qa([context], tokenizer, template, branches_per_sample=len(questions),
                           training=False)
    return prompts_only(samples)[0]  # no gold answers: the targets are what the model writes


def generate(run, run_dir: Path) -> dict:
    """Print the layout, then each branch's answer as it is decoded, one column at a time."""
    if not (run.model.path or run.model.arch == "hub"):
        raise ValueError("stage=generate needs a trained model: set model.path=<run dir>/model")
    model, tokenizer = models.load_model(run.model)
    if tokenizer is None:
        raise ValueError(f"model.path={run.model.path}: no tokenizer found beside the model")
    model.eval()
    gen, coll = run.generate, run.collator
    template = getattr(run.data, "template", None) or QATemplate()
    sample = build_sample(gen.background, list(gen.questions), tokenizer, template)
    layout = build_layout([sample], align_to=coll.align_to, branch_stride=coll.branch_stride,
                          pad_id=tokenizer.pad_token_id or 0)
    print(layout_table(layout, tokenizer))
    if gen.plot:
        path = plot_layout(layout, 0, Path(run_dir) / "layout.png",
                           token_text=lambda t: tokenizer.decode([t]))
        print(f"layout picture: {path}")
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
