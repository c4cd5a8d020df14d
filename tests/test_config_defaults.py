"""Each default is stated once: in the typed schemas (paradec/config.py, the data tasks' own).

No file that sits directly on a schema (a group's default file, a data task, a model preset) may
restate a schema default (a second copy drifts: it did, for rope_theta, max_position_embeddings
and the LoRA dropout), and the model code builds from the typed config, so a key a preset leaves
out gets the schema's value and nothing else. Stage and experiment files are not checked: they
override the composed config (a preset's value, another stage's), so a value equal to a schema
default can be a real choice there (``model.pair_indices: []`` over a preset's pairs).
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from paradec import config as schemas
from paradec import models
from paradec.attention import columnar_kernel
from paradec.tasks import DATA_SCHEMAS

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_SCHEMAS = {"collator": schemas.CollatorConfig, "trainer": schemas.TrainerConfig,
                 "eval": schemas.EvalConfig, "bench": schemas.BenchConfig,
                 "logger": schemas.LoggerConfig, "model": schemas.ModelConfig}
NO_DEFAULT = object()


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return NO_DEFAULT if f.default == "???" else f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return NO_DEFAULT


def restated(node: dict, schema, prefix: str = "", data_schema=None) -> list[str]:
    """Keys of ``node`` whose value equals ``schema``'s default for that key."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key, value in node.items():
        if key in ("defaults", "hydra") or key not in fields:
            continue
        where = f"{prefix}{key}"
        if schema is schemas.Config and key == "data":
            if data_schema is not None and isinstance(value, dict):
                out += restated(value, data_schema, f"{where}.")
            continue
        if schema is schemas.PipelineConfig and key in ("pretrain", "finetune", "eval"):
            out += restated(value or {}, schemas.Config, f"{where}.")  # a stage's overrides
            continue
        default = _default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            out += restated(value, type(default), f"{where}.", data_schema)
        elif default is not NO_DEFAULT and value == default:
            out.append(f"{where}: {value!r}")
    return out


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def _chosen_data(node: dict):
    """The data schema a global file selects (``override /data: x``), if any."""
    for item in node.get("defaults") or []:
        if isinstance(item, dict):
            for key, value in item.items():
                if key.endswith("/data") and value in DATA_SCHEMAS:
                    return DATA_SCHEMAS[value]
    return None


def _cases():
    for group, schema in GROUP_SCHEMAS.items():
        for path in sorted((CONF / group).glob("*.yaml")):
            yield path, schema, None
    for path in sorted((CONF / "data").glob("*.yaml")):
        yield path, DATA_SCHEMAS[path.stem], None


@pytest.mark.parametrize("path,schema,package", list(_cases()),
                         ids=lambda v: str(v.relative_to(CONF)) if isinstance(v, Path) else "")
def test_no_yaml_file_restates_a_schema_default(path, schema, package):
    node = _yaml(path)
    data_schema = _chosen_data(node) if package else None
    found = restated(node, schema, "" if package else f"{path.parent.name}.", data_schema)
    assert not found, (f"{path.relative_to(CONF)} restates schema defaults (state each once, in "
                       f"the schema): {found}")


def test_the_check_finds_a_restated_default(tmp_path):
    """The check above can fail: a file that restates defaults, nested ones included."""
    node = {"trainer": {"lr": schemas.TrainerConfig.lr, "max_steps": 7},
            "model": {"lora": {"dropout": schemas.LoraSettings.dropout}},
            "pipeline": {"finetune": {"eval": {"split": "test"}}}}
    assert restated(node, schemas.Config) == [
        f"trainer.lr: {schemas.TrainerConfig.lr!r}",
        f"model.lora.dropout: {schemas.LoraSettings.dropout!r}",
        "pipeline.finetune.eval.split: 'test'"]


SHAPE = dict(name="t", arch="llama", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
             num_kv_heads=1, head_dim=16, intermediate_size=64, tie_word_embeddings=True,
             rope_theta=1e4, max_position_embeddings=256, initializer_range=0.02)


def test_a_preset_states_its_whole_architecture():
    """No fallback fills an architecture field a from-scratch preset leaves out."""
    for key in ("rope_theta", "max_position_embeddings", "initializer_range",
                "tie_word_embeddings"):
        with pytest.raises(ValueError, match=f"model.{key} must be set"):
            models.build_model({k: v for k, v in SHAPE.items() if k != key})


def test_settings_left_unsaid_get_the_schema_defaults():
    """A preset mapping without the optional settings builds with the schema's values."""
    model, _ = models.build_model(SHAPE)
    defaults = schemas.ModelConfig(**SHAPE)
    assert model.config.columnar["branch_stride"] == defaults.branch_stride
    assert model.config._attn_implementation == columnar_kernel(defaults.attn_implementation)
    assert next(model.parameters()).dtype == models.DTYPES[defaults.dtype]
    built = models.transformers_config(SHAPE)
    assert built.rope_parameters["rope_theta"] == SHAPE["rope_theta"]


def test_lora_left_unsaid_gets_the_schema_defaults():
    model, _ = models.build_model(SHAPE)
    wrapped = models.add_lora(model, {"target_modules": ["q_proj"]}, "base")
    peft_config = wrapped.peft_config["default"]
    defaults = schemas.LoraSettings()
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (
        defaults.r, defaults.alpha, defaults.dropout)


def test_the_schema_module_imports_no_stage_code():
    """The CLI reads the schemas before it knows the stage: they pull in no stage's code."""
    code = ("import sys, paradec.config; print(sorted(m for m in sys.modules "
            "if m.startswith('paradec')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    loaded = eval(out)  # noqa: S307 - the list printed above
    for module in ("paradec.training", "paradec.evaluation", "paradec.bench", "paradec.stages",
                   "paradec.models", "paradec.decoding"):
        assert module not in loaded, loaded
