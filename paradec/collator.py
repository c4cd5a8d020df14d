"""The collator: dataset items -> one :class:`~paradec.layout.Layout` per batch.

Invariant: the collator only groups and draws the random choices (branch counts, time offsets);
every position, label and order comes from :func:`paradec.layout.build_layout`, the one layout
builder. Its settings are :class:`paradec.config.CollatorConfig`, the schema of the one config group
``conf/collator/`` that every stage composes, so training and evaluation can never disagree.

Items may be
  * :class:`BranchSample` (already grouped, e.g. the questions of one SQuAD context): kept as is,
    or, with ``min/max_branches_per_sample`` set, cut to a seeded random subset of its branches
    (so a model finetuned on QA also sees fewer questions per context, down to one);
  * :class:`Branch`, a token list, or a dict with ``input_ids`` (e.g. one pretraining text chunk):
    consecutive items are grouped into samples of ``branches_per_sample`` branches, or of a seeded
    random count in ``[min_branches_per_sample, max_branches_per_sample]``, with no background.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from .config import CollatorConfig
from .layout import Branch, BranchSample, Layout, build_layout


def _as_branch(item: Any) -> Branch:
    if isinstance(item, Branch):
        return item
    if isinstance(item, dict):
        item = item["input_ids"]
    return Branch(prompt=[], target=list(item))


class ColumnarCollator:
    """``collate_fn`` for a ``torch.utils.data.DataLoader``; returns a :class:`Layout`."""

    def __init__(self, config: CollatorConfig | None = None, pad_id: int = 0, tokenizer=None,
                 **overrides):
        config = config or CollatorConfig()
        if overrides:
            config = CollatorConfig(**{**config.__dict__, **overrides})
        self.config = config.validate()
        if self.config.format == "joint" and tokenizer is None:
            raise ValueError("collator.format=joint needs the tokenizer (it writes the numbering)")
        self.pad_id = pad_id
        self.tokenizer = tokenizer
        self.rng = random.Random(config.seed)

    # The random stream is part of a training run's state, so a resumed run draws the same.
    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])

    def _branch_count(self) -> int:
        c = self.config
        if c.min_branches_per_sample is None:
            return c.branches_per_sample
        return self._draw_count(c.min_branches_per_sample, c.max_branches_per_sample)

    def _draw_count(self, lo: int, hi: int) -> int:
        """A seeded random branch count in ``[lo, hi]``, weighted by ``count_weighting``."""
        if self.config.count_weighting == "sample" or lo == hi:
            return self.rng.randint(lo, hi)
        counts = range(lo, hi + 1)
        return self.rng.choices(counts, weights=[1 / k for k in counts])[0]

    def _subsample(self, sample: BranchSample) -> BranchSample:
        """A seeded random subset of a ready sample's branches (in order), when counts are random."""
        c, n = self.config, len(sample.branches)
        if c.min_branches_per_sample is None or n <= c.min_branches_per_sample:
            return sample
        k = self._draw_count(c.min_branches_per_sample, min(c.max_branches_per_sample, n))
        if k == n:
            return sample
        keep = sorted(self.rng.sample(range(n), k))
        meta = {key: [value[i] for i in keep] if isinstance(value, list) and len(value) == n
                else value for key, value in sample.meta.items()}
        return BranchSample(sample.background, [sample.branches[i] for i in keep], meta)

    def group(self, items: Sequence[Any]) -> list[BranchSample]:
        """Group loose branches into samples; pass ready samples through, in order."""
        samples, loose = [], []

        def flush():
            while loose:
                k = self._branch_count()
                samples.append(BranchSample(background=[], branches=loose[:k]))
                del loose[:k]

        for item in items:
            if isinstance(item, BranchSample):
                flush()
                samples.append(self._subsample(item))
            else:
                loose.append(_as_branch(item))
        flush()
        return samples

    def rows(self, samples: list[BranchSample]) -> list[BranchSample]:
        """The grouped samples in ``collator.format`` (one layout row each)."""
        from .prompts import joint_training_sample, single_training_samples

        if self.config.format == "single":
            return [row for s in samples for row in single_training_samples(s)]
        if self.config.format == "joint":
            eos = self.tokenizer.eos_token_id
            return [joint_training_sample(s, self.tokenizer, eos) for s in samples]
        return samples

    def __call__(self, items: Sequence[Any]) -> Layout:
        c = self.config
        samples = self.rows(self.group(items))
        offsets = None
        if c.random_time_offset > 0:
            offsets = [self.rng.randint(0, c.random_time_offset) for _ in samples]
        layout = build_layout(
            samples, align_to=c.align_to, interleave=c.interleave_branches,
            branch_stride=c.branch_stride, time_offsets=offsets, pad_to=c.pad_to,
            pad_id=self.pad_id, loss_on=c.loss_on)
        layout.isolate_branches = c.isolate_branches
        return layout
