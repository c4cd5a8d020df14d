"""What each stage does, from a composed config: short functions readable from run.py.

Invariant: every stage builds its model, data and collator from the same config groups, through
the same functions (``paradec.models``, ``paradec.tasks``, ``paradec.collator``), so pretraining,
finetuning and evaluation cannot drift apart. A data problem (:class:`paradec.tasks.DataError`)
or a bad config value ends the run before any model is written, with a non-zero exit and a
one-line cause.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import models
from .collator import ColumnarCollator
from .config import Config, section_values, to_run_config
from .tasks import DataError, load_task
from .tracking import Tracker

log = logging.getLogger("paradec")


def run(cfg: DictConfig):
    """Dispatch on ``stage.name``; exit non-zero with one line on a data or config error."""
    from .training import Interrupted

    try:
        run_cfg = to_run_config(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return STAGE_RUNNERS[run_cfg.stage.name](run_cfg, run_dir, cfg)
    except (DataError, ValueError, FileNotFoundError) as err:
        log.error("%s: %s", type(err).__name__, err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)


def _run_identity(run: Config) -> tuple[str | None, str | None]:
    """wandb run name (stage + overrides) and group (the multirun sweep), from Hydra."""
    hydra = HydraConfig.get()
    name = run.logger.name or "-".join(
        filter(None, [run.stage.name, hydra.job.override_dirname or None]))
    group = run.logger.group
    if group is None and hydra.mode is not None and hydra.mode.name == "MULTIRUN":
        group = Path(hydra.sweep.dir).name
    return name, group


def _is_main_process() -> bool:
    """False on every process but the first under ``accelerate launch`` / ``torchrun``."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def _resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def command_line() -> list[str]:
    """The run's command-line overrides (``key=value`` and group choices); empty outside Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _key(item: str) -> str:
    return item.lstrip("+~").partition("=")[0]


def adopt_saved_columnar(run: Config) -> None:
    """The 2D RoPE settings saved with ``model.path`` win over the preset's defaults.

    Pretraining and finetuning must use the same pairs and stride (else the finetuned model
    reads every branch position differently from how it learned them);
    overriding them on the command line to something else is an error naming the key.
    """
    if not run.model.path:
        return
    saved = models.saved_columnar_settings(run.model.path)
    if saved is None:
        return
    explicit = {_key(item) for item in command_line()}  # a user's choice, not a default
    pairs, stride = [int(k) for k in saved["pair_indices"]], int(saved["branch_stride"])
    checks = (("model.pair_indices", run.model.pair_indices, pairs),
              ("model.branch_stride", run.model.branch_stride, stride),
              ("collator.branch_stride", run.collator.branch_stride, stride))
    for key, value, saved_value in checks:
        if key in explicit and value != saved_value:
            raise ValueError(
                f"{key}={value} conflicts with the model at model.path={run.model.path}, which was "
                f"trained with {saved_value}; drop the override (the saved setting is used)")
    run.model.pair_indices, run.model.branch_stride = pairs, stride
    run.collator.branch_stride = stride


def check_row_format(run: Config) -> None:
    """``collator.format`` single / joint trains plain causal rows: the unpatched model."""
    fmt = run.collator.format
    if fmt == "columnar":
        return
    if run.model.pair_indices:
        raise ValueError(f"collator.format={fmt} trains plain one-branch rows, as the unpatched "
                         f"model reads them: set model.pair_indices=[] (got "
                         f"{list(run.model.pair_indices)})")
    if fmt == "joint" and run.stage.data_kind != "qa":
        raise ValueError(f"collator.format=joint numbers the questions of a context: it needs "
                         f"QA data, but stage={run.stage.name} trains on {run.stage.data_kind!r}")


def model_for_training(run: Config, task, run_dir: Path | None = None):
    """The stage's model and tokenizer: a checkpoint or Hub model, or a from-scratch preset
    with a byte-level BPE tokenizer trained on the task's training text; with
    ``model.lora.enabled``, wrapped in a LoRA adapter that points to its saved base."""
    mcfg = run.model
    model, tokenizer = _base_model(run, task)
    if mcfg.lora.enabled:
        if mcfg.path and models.is_adapter_dir(mcfg.path):
            raise ValueError(f"model.path={mcfg.path} is a LoRA adapter: merge it first "
                             "(model.lora.merge=true) to train a new adapter on top")
        if mcfg.path:
            base = Path(mcfg.path).resolve()
        elif mcfg.arch == "hub" or mcfg.gguf_file:  # the Hub id, or the cached GGUF checkpoint
            base = models.unwrap_model(model).name_or_path
        else:
            base = None
        if base is None:  # a from-scratch base: save it so the adapter can point to it
            base = (Path(run_dir) / "base_model").resolve()
            if _is_main_process():  # DDP starts every process from the main one's weights
                models.save_model(model, tokenizer, base)
        model = models.add_lora(model, mcfg.lora, base)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA r=%d on %s: %d trainable parameters", mcfg.lora.r,
                 list(mcfg.lora.target_modules), trainable)
    return model, tokenizer


def _base_model(run: Config, task):
    mcfg = run.model
    if mcfg.path or mcfg.gguf_file or mcfg.arch == "hub":
        model, tokenizer = models.load_model(mcfg)
    else:
        if mcfg.tokenizer.path:
            tokenizer = models.load_tokenizer(mcfg.tokenizer.path)
        else:
            log.info("training a %d-token BPE tokenizer on the %s training text",
                     mcfg.tokenizer.vocab_size, run.data.name)
            texts = itertools.islice(task.texts("train"), mcfg.tokenizer.train_texts)
            tokenizer = models.train_tokenizer(texts, mcfg.tokenizer.vocab_size)
        model, tokenizer = models.build_model(mcfg, tokenizer)
    if tokenizer is None:
        raise ValueError(f"model.path={mcfg.path}: no tokenizer found beside the model")
    log.info("model %s: %.2fM parameters", mcfg.name, models.count_parameters(model) / 1e6)
    return model, tokenizer


def _datasets(run: Config, task, tokenizer):
    kind = run.stage.data_kind
    if kind not in task.kinds:
        raise ValueError(f"data={run.data.name} provides {list(task.kinds)} data, but "
                         f"stage={run.stage.name} needs {kind!r}")
    branches = run.collator.max_branches
    train = task.dataset("train", tokenizer, kind, branches)
    val = task.dataset("validation", tokenizer, kind, branches) if run.trainer.eval_every else None
    return train, val


def train_stage(run: Config, run_dir: Path, cfg: DictConfig):
    """pretrain / finetune: the one training loop over the stage's data kind."""
    from . import rundir
    from .training import make_accelerator, shared_run_dir

    adopt_saved_columnar(run)
    check_row_format(run)
    task = load_task(run.data)
    accelerator = make_accelerator(run.trainer)
    run_dir = shared_run_dir(accelerator, run_dir)  # one run dir for all processes
    # The main process owns the run dir (a lock held for the whole run); the others share it.
    owner = rundir.lock(run_dir) if accelerator.is_main_process else None
    try:
        return _train(run, run_dir, cfg, task, accelerator, owner)
    finally:
        if owner is not None:
            owner.release()


def _train(run: Config, run_dir: Path, cfg: DictConfig, task, accelerator, owner):
    from .training import Trainer, check_resume_settings, resolve_resume

    owner_id = owner.run_id if owner is not None else None
    resume = resolve_resume(run.trainer.resume, run_dir, owner_id)
    own_checkpoint = (resume is not None
                      and (run_dir / "checkpoints").resolve() in resume.resolve().parents)
    if owner is not None:
        owner.start(resuming=own_checkpoint, overwrite=run.trainer.overwrite)
    if resume is not None:
        model, tokenizer = models.load_pretrained(resume / "model", trainable=True)
        # A LoRA base from the Hub or a GGUF does not record the 2D RoPE settings: re-apply them.
        model = models.apply_columnar(model, run.model.pair_indices, run.model.branch_stride)
        state = json.loads((resume / "trainer_state.json").read_text())
        wandb_id = state.get("wandb_run_id")
        changed = check_resume_settings(state.get("config") or {}, _resolved(cfg),
                                        list(run.trainer.allow_changes), resume)
        if changed:
            log.warning("resuming %s with changed settings (trainer.allow_changes): %s", resume,
                        ", ".join(changed))
    else:
        model, tokenizer = model_for_training(run, task, run_dir)
        wandb_id = None
    train_data, val_data = _datasets(run, task, tokenizer)
    collator = ColumnarCollator(run.collator, pad_id=tokenizer.pad_token_id or 0,
                                tokenizer=tokenizer)
    items_per_sample = run.collator.branches_per_sample if run.stage.data_kind == "text" else 1
    name, group = _run_identity(run)
    with Tracker(run_dir, main_process=accelerator.is_main_process, logger_cfg=run.logger,
                 config=_resolved(cfg), job_type=run.stage.name, name=name, group=group,
                 resume_id=wandb_id) as tracker:
        trainer = Trainer(model=model, tokenizer=tokenizer, train_data=train_data,
                          val_data=val_data, collator=collator, cfg=run.trainer, run_dir=run_dir,
                          accelerator=accelerator, tracker=tracker,
                          items_per_sample=items_per_sample, run_config=_resolved(cfg))
        trainer.run_id = owner.run_id if owner is not None else None
        if resume is not None:
            trainer.resume_from(resume)
        result = trainer.fit()
    if accelerator.is_main_process:
        if run.model.lora.enabled and run.model.lora.merge:
            merged = models.merge_lora(accelerator.unwrap_model(trainer.model))
            models.save_model(merged, tokenizer, run_dir / "model_merged")
            log.info("merged adapter saved in %s", run_dir / "model_merged")
        log.info("%s done: %d steps, final loss %.4f; model in %s", run.stage.name, result.step,
                 result.last_loss, result.model_dir)
    return {"model_dir": str(result.model_dir), "loss": result.last_loss,
            "val_loss": result.val_loss}


def eval_stage(run: Config, run_dir: Path, cfg: DictConfig):
    """Answer every question of ``eval.split`` in each mode; write eval.json / predictions.jsonl.

    Under ``accelerate launch`` / ``torchrun`` every process answers its share of the contexts
    on its own device and the main process writes the one eval.json and wandb run
    (:func:`paradec.evaluation.evaluate`); the report is returned there, None elsewhere."""
    from accelerate import PartialState

    from .evaluation import check_memory, evaluate, first_contexts, format_table
    from .training import finetuned_format, shared_run_dir

    if not (run.model.path or run.model.gguf_file or run.model.arch == "hub"):
        raise ValueError("stage=eval needs a trained model: set model.path=<run dir>/model")
    state = PartialState(cpu=not torch.cuda.is_available())
    run_dir = shared_run_dir(state, run_dir)  # one eval.json for all processes
    adopt_saved_columnar(run)
    task = load_task(run.data)
    model, tokenizer = models.load_model(run.model)
    if tokenizer is None:
        raise ValueError(f"model.path={run.model.path}: no tokenizer found beside the model")
    if "qa" not in task.kinds:
        raise ValueError(f"data={run.data.name} has no questions to evaluate (kinds {task.kinds})")
    model.eval().to(state.device)
    dataset = task.dataset(run.eval.split, tokenizer, "qa", run.collator.max_branches)
    samples = first_contexts(dataset, run.eval.max_samples, run.eval.context_stride)
    check_memory(samples, run.eval, models.unwrap_model(model).config)
    name, group = _run_identity(run)
    with Tracker(run_dir, main_process=state.is_main_process, logger_cfg=run.logger,
                 config=_resolved(cfg), job_type="eval", name=name, group=group) as tracker:
        report = evaluate(model, tokenizer, samples, run.eval, run.collator, run_dir,
                          tracker=tracker, progress=run.trainer.progress,
                          finetuned_format=finetuned_format(run.model.path))
    if report is None:  # not the main process
        return None
    print(format_table(report))
    log.info("wrote %s and %s", run_dir / "eval.json", run_dir / "predictions.jsonl")
    return report


def bench_stage(run: Config, run_dir: Path, cfg: DictConfig):
    """Speed and memory of parallel decoding, measured side by side (paradec/bench/)."""
    from .bench.stage import run_benchmarks

    adopt_saved_columnar(run)  # bench.models=[] times the composed model (e.g. model.path)
    return run_benchmarks(run, run_dir, cfg)


def generate_stage(run: Config, run_dir: Path, cfg: DictConfig):
    """The layout table, then the answers as they are decoded (paradec/generate.py)."""
    from .generate import generate

    adopt_saved_columnar(run)
    return generate(run, run_dir)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Groups the stages of a pipeline do not take from its command line: the stage is the pipeline's
# to choose, and a sweep definition configures the sweeper only.
NOT_PASSED_TO_STAGES = ("stage", "sweep")


def stage_config(stage: str, section, owned: dict | None = None,
                 overrides: list[str] | None = None) -> DictConfig:
    """The config of one pipeline stage: composed by Hydra exactly as ``python run.py
    stage=<stage>`` with the pipeline's command line would compose it, then its section.

    In order, each winning over the ones before: the composed config (the stage's own file, the
    groups and every ``key=value`` of the command line, so a key the user set reaches every
    stage); the stage's ``section`` (``run.pipeline.<stage>``, or a dict of dotted keys), except
    the keys the
    command line set, unless it set them as ``pipeline.<stage>.<key>``; ``owned``, what the
    pipeline itself chains (the model each stage starts from). A section's ``data.name`` selects
    that stage's data group (``data=<name>``: its own file and schema), and command-line
    ``data.*`` keys then skip the stage. ``overrides``: the command line (default: this run's).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .tasks import DATA_SCHEMAS

    overrides = command_line() if overrides is None else list(overrides)
    section = dict(section) if isinstance(section, dict) else section_values(section)
    task = section.pop("data.name", None)
    if task is not None and task not in DATA_SCHEMAS:
        raise ValueError(f"pipeline.{stage}.data.name: unknown data task {task!r} (known: "
                         f"{', '.join(DATA_SCHEMAS)})")
    explicit = {_key(o)[len(f"pipeline.{stage}."):] for o in overrides
                if _key(o).startswith(f"pipeline.{stage}.")}
    passed, set_here = [], set()
    for item in overrides:
        key = _key(item)
        if key.split(".")[0] in NOT_PASSED_TO_STAGES or key.startswith(("hydra", "pipeline.")):
            continue
        if key in explicit or (task is not None and (key == "data" or key.startswith("data."))):
            continue
        passed.append(item)
        set_here.add(key)
    passed.append(f"stage={stage}")
    if task is not None:
        passed.append(f"data={task}")
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="config", overrides=passed)
    else:  # called outside a Hydra app (scripts, tests)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=passed)
    for key, value in section.items():
        if key in set_here and key not in explicit:
            continue  # the command line's value reaches every stage
        _set(cfg, key, value, f"pipeline.{stage}.{key}")
    for key, value in (owned or {}).items():
        _set(cfg, key, value, key)
    return cfg


def _set(cfg: DictConfig, key: str, value, name: str) -> None:
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as err:
        raise ValueError(f"{name}={value!r}: {str(err).splitlines()[0]}") from None


def pipeline_stage(run: Config, run_dir: Path, cfg: DictConfig):
    """pretrain -> finetune -> eval, each in its own subdirectory; eval.json on top."""
    import shutil

    group = {"logger.group": run.logger.group or f"pipeline-{run_dir.name}"}
    model_path = run.model.path
    sections = run.pipeline
    if not sections.skip_pretrain:
        sub = stage_config("pretrain", sections.pretrain, group)
        model_path = train_stage(to_run_config(sub), run_dir / "pretrain", sub)["model_dir"]
    elif not (model_path or run.model.gguf_file or run.model.arch == models.HUB):
        raise ValueError("pipeline.skip_pretrain=true needs a pretrained model: model.path, "
                         "model.gguf_file or a Hub preset")
    start = {"model.path": model_path} if model_path else {}
    zero_shot = None
    if sections.zero_shot_modes:  # the starting model, before finetuning, on the same questions
        modes = {"eval.modes": list(sections.zero_shot_modes)}
        sub = stage_config("eval", sections.eval, {**group, **start, **modes})
        zero_shot = eval_stage(to_run_config(sub), run_dir / "zero_shot", sub)
    sub = stage_config("finetune", sections.finetune, {**group, **start})
    model_path = train_stage(to_run_config(sub), run_dir / "finetune", sub)["model_dir"]
    sub = stage_config("eval", sections.eval, {**group, "model.path": model_path})
    report = eval_stage(to_run_config(sub), run_dir / "eval", sub)
    if report is None:  # not the main process
        return None
    shutil.copy(run_dir / "eval" / "predictions.jsonl", run_dir / "predictions.jsonl")
    if zero_shot is not None:  # one table: the zero-shot rows as zero_shot_<mode>
        report = {**{f"{ZERO_SHOT}{m}": row for m, row in zero_shot.items()}, **report}
        with open(run_dir / "predictions.jsonl", "a", encoding="utf-8") as out:
            for line in (run_dir / "zero_shot" / "predictions.jsonl").read_text().splitlines():
                record = json.loads(line)
                record["mode"] = ZERO_SHOT + record["mode"]
                out.write(json.dumps(record) + "\n")
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    log.info("pipeline done: %s", {m: round(r["em"], 3) for m, r in report.items()})
    return report


ZERO_SHOT = "zero_shot_"  # prefix of the starting model's modes in a pipeline's eval.json


STAGE_RUNNERS = {
    "pretrain": train_stage,
    "finetune": train_stage,
    "eval": eval_stage,
    "generate": generate_stage,
    "pipeline": pipeline_stage,
    "bench": bench_stage,
}
