"""The training loop: one explicit loop for columnar pretraining and finetuning, on accelerate.

Invariant: every step sees layouts from the one collator (``conf/collator``), runs the model
through the one forward path (:func:`paradec.models.forward_layout`, columnar mask + 2D positions)
and optimises the one loss (:func:`paradec.loss.columnar_loss`, no shift). Gradient accumulation
is normalised by the target tokens of the whole optimizer step (over micro-batches and processes),
so the gradient does not depend on how a step is split. A run's state (weights, optimizer,
schedule, RNGs, data position, collator RNG, wandb id) is checkpointed atomically, and
``trainer.resume=auto`` continues exactly where the newest complete checkpoint left off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .batches import BatchStream, fixed_batches
from .collator import ColumnarCollator
from .config import TrainerConfig
from .loss import IGNORE_INDEX, columnar_loss
from .models import forward_layout, save_model

log = logging.getLogger(__name__)


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to the peak, then cosine decay to ``min_ratio`` of it at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: TrainerConfig):
    """AdamW; no weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=torch.cuda.is_available() or None)


def mixed_precision(choice: str) -> str:
    """``auto``: bf16 on GPUs that have it, else fp16 on GPU; fp32 on CPU."""
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def labelled_loss(model, layout):
    """The forward and the summed loss of one layout: ``(outputs, loss_sum, n_tokens)``.

    The vocabulary projection runs only where a token has a label (``logits_to_keep`` as a
    boolean mask, so ``outputs.logits`` is ``[n_tokens, V]``). Same loss and gradients as
    projecting every position, but a QA batch labels a few percent of its tokens (answers only)
    and the projection is the widest matmul of a small model, or a 151K-wide one for Qwen3.
    """
    keep = layout.labels != IGNORE_INDEX
    outputs = forward_layout(model, layout, logits_to_keep=keep)
    loss_sum, n_tokens = columnar_loss(outputs.logits, layout.labels[keep], reduction="sum")
    return outputs, loss_sum, n_tokens


def router_aux_loss(model, outputs) -> torch.Tensor | None:
    """The MoE load-balancing loss, scaled by the model's coefficient (None for dense models)."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return None
    return getattr(model.config, "router_aux_loss_coef", 0.01) * aux


@dataclass
class TrainResult:
    model_dir: Path
    step: int
    last_loss: float
    val_loss: Optional[float]


class Trainer:
    """Holds what one training run needs; :meth:`fit` is the loop."""

    def __init__(self, *, model, tokenizer, train_data, val_data, collator: ColumnarCollator,
                 cfg: TrainerConfig, run_dir: Path, accelerator: Accelerator, tracker,
                 items_per_sample: int = 1, run_config: dict | None = None):
        self.cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.tracker = tracker
        self.tokenizer = tokenizer
        self.collator = collator
        self.run_config = run_config or {}
        self.stream = BatchStream(train_data, cfg.batch_size * items_per_sample, seed=cfg.seed,
                                  rank=accelerator.process_index,
                                  world_size=accelerator.num_processes)
        self.val_data = val_data
        self.items_per_sample = items_per_sample
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.run_id: str | None = None  # the run dir's owner (paradec.rundir); in checkpoints
        self.step = 0
        self._first_batch: str | None = None  # fingerprint of this process's first batch

    # -- state ---------------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def sharded(self) -> bool:
        """Whether each process holds only a shard of the weights and optimizer state (FSDP)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def resume_from(self, path: Path) -> None:
        """Restore everything but the weights (loaded with the model) from checkpoint ``path``;
        the optimizer settings of this run's config then apply (they equal the checkpoint's
        unless ``trainer.allow_changes`` lets them differ)."""
        sharded = ckpt.has_sharded_optimizer(path)
        if sharded != self.sharded:
            saved, now = ("an FSDP", "without FSDP") if sharded else ("a non-FSDP", "under FSDP")
            raise ValueError(
                f"trainer.resume: checkpoint {path} holds the optimizer state of {saved} run, "
                f"and this run is {now}: resume it with the launch settings it was saved with, "
                f"or start a new run from its weights (model.path={Path(path) / 'model'})")
        state = ckpt.load_training_state(path, None if sharded else self.optimizer,
                                         self.scheduler)
        if sharded:
            ckpt.load_sharded_optimizer(self.model, self.optimizer,
                                        Path(path) / ckpt.SHARDED_OPTIMIZER)
        apply_optimizer_settings(self.optimizer, self.scheduler, self.cfg)
        self.stream.load_state_dict(state["data"])
        self.collator.load_state_dict(_collator_state_from_json(state["collator"]))
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)

    def _gathered_state_dict(self) -> dict | None:
        """Under FSDP the full weights must be gathered on every process before rank 0 saves
        them (``accelerator.get_state_dict``); elsewhere ``save_pretrained`` reads the model."""
        if self.sharded:
            return self.accelerator.get_state_dict(self.model)
        return None

    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = self._gathered_state_dict()
        if self.sharded:  # every process writes its optimizer shard before the main one finishes
            if acc.is_main_process:
                ckpt.begin_checkpoint(self.checkpoint_root, self.step)
            acc.wait_for_everyone()
            staging = ckpt.staging_dir(self.checkpoint_root, self.step)
            ckpt.save_sharded_optimizer(self.model, self.optimizer,
                                        staging / ckpt.SHARDED_OPTIMIZER)
            acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        state = {
            "data": self.stream.state_dict(),
            "collator": _collator_state_to_json(self.collator.state_dict()),
            "run_id": self.run_id,
            "wandb_run_id": self.tracker.run_id,
            "config": self.run_config,
        }
        return ckpt.save_checkpoint(
            self.checkpoint_root, self.step, model=self.accelerator.unwrap_model(self.model),
            tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state=state, keep_last=self.cfg.keep_checkpoints, state_dict=state_dict,
            sharded_optimizer=self.sharded)

    # -- one step ------------------------------------------------------------------------------
    def _reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value, reduction="sum") if self.accelerator.num_processes > 1 \
            else value

    def train_step(self) -> dict:
        acc, device = self.accelerator, self.accelerator.device
        layouts = [self.collator(next(self.stream)).to(device) for _ in range(self.cfg.grad_accum)]
        if self._first_batch is None:
            self._first_batch = tensor_fingerprint(layouts[0].input_ids)
            log.debug("process %d/%d: first batch %s", acc.process_index, acc.num_processes,
                      self._first_batch)
        # Normalise by the target tokens of the whole step on all processes: DDP averages
        # gradients over processes, hence the world-size factor.
        local_tokens = sum((lay.labels != IGNORE_INDEX).sum() for lay in layouts).float()
        step_tokens = self._reduce_sum(local_tokens.clone()).clamp(min=1)
        scale = acc.num_processes / step_tokens
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        for i, layout in enumerate(layouts):
            last = i == len(layouts) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            with sync, acc.autocast():
                outputs, token_loss, _ = labelled_loss(self.model, layout)
                loss = token_loss * scale
                aux = router_aux_loss(acc.unwrap_model(self.model), outputs)
                if aux is not None:
                    loss = loss + aux / len(layouts)
            acc.backward(loss)
            loss_sum += token_loss.detach()
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip) \
            if self.cfg.grad_clip > 0 else torch.zeros(())
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean_loss = self._reduce_sum(loss_sum) / step_tokens
        return {"train/loss": float(mean_loss), "train/lr": lr,
                "train/grad_norm": float(grad_norm), "train/target_tokens": int(step_tokens),
                "_tokens": int(sum(lay.valid.sum() for lay in layouts)) * acc.num_processes}

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean target-token loss and perplexity over the first ``eval_batches`` validation batches.

        Always the loss of the target tokens (what the decoder writes), whatever
        ``collator.loss_on`` trains, so validation curves compare across that setting.
        """
        if self.val_data is None or self.cfg.eval_batches == 0:
            return {}
        acc = self.accelerator
        # Its own collator RNG: validation must never change the training stream.
        collator = ColumnarCollator(self.collator.config, pad_id=self.collator.pad_id,
                                    tokenizer=self.collator.tokenizer, loss_on="target")
        self.model.eval()
        total = torch.zeros((), device=acc.device)
        tokens = torch.zeros((), device=acc.device)
        for items in fixed_batches(self.val_data, self.cfg.batch_size * self.items_per_sample,
                                   self.cfg.eval_batches, acc.process_index, acc.num_processes):
            layout = collator(items).to(acc.device)
            with acc.autocast():
                _, loss_sum, n_tokens = labelled_loss(self.model, layout)
            total += loss_sum
            tokens += n_tokens
        loss = float(self._reduce_sum(total) / self._reduce_sum(tokens).clamp(min=1))
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}

    # -- the loop ------------------------------------------------------------------------------
    def _stop_requested(self, stop: StopSignal) -> bool:
        """Whether any process received SIGINT / SIGTERM (every process stops at the same step)."""
        if self.accelerator.num_processes == 1:
            return stop.signum is not None
        flag = torch.tensor(float(stop.signum is not None), device=self.accelerator.device)
        return bool(self._reduce_sum(flag) > 0)

    def fit(self) -> TrainResult:
        with StopSignal() as stop:
            return self._fit(stop)

    def _fit(self, stop: "StopSignal") -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        last_loss, val_loss = float("nan"), None
        while self.step < cfg.max_steps:
            if self._stop_requested(stop):
                bar.close()
                path = self.save_checkpoint()
                raise Interrupted(stop.signum or signal.SIGTERM, self.step, path)
            start = time.perf_counter()
            metrics = self.train_step()
            tokens = metrics.pop("_tokens")
            metrics["train/tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
            last_loss = metrics["train/loss"]
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                metrics.update(self.validate())
                val_loss = metrics.get("val/loss", val_loss)
            if self.step % cfg.log_every == 0 or "val/loss" in metrics:
                self.tracker.log(metrics, step=self.step)
            bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{metrics['train/lr']:.2e}",
                            tok_s=f"{metrics['train/tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        model_dir = self.run_dir / "model"
        acc.wait_for_everyone()
        state_dict = self._gathered_state_dict()
        if acc.is_main_process:
            save_model(acc.unwrap_model(self.model), self.tokenizer, model_dir,
                       state_dict=state_dict)
            write_finetuned_format(model_dir, self.collator.config.format)
        self.tracker.summary({"train/final_loss": last_loss,
                              **({"val/final_loss": val_loss} if val_loss is not None else {})})
        if os.environ.get("PARADEC_RANK_REPORT"):
            self.write_rank_report()
        return TrainResult(model_dir=model_dir, step=self.step, last_loss=last_loss,
                           val_loss=val_loss)


    def write_rank_report(self) -> list[dict]:
        """What each process holds at the end, gathered into ``<run_dir>/ranks.json`` (main only).

        Per process: its rank, a fingerprint of its first batch (ranks must differ), a SHA-256 of
        its parameters and of its tokenizer's vocabulary (ranks must agree under DDP). Enabled by
        the environment variable ``PARADEC_RANK_REPORT=1`` (hashing every weight costs time on
        big models). Under FSDP / DeepSpeed each process holds a different shard: no checksum.
        """
        from accelerate.utils import DistributedType

        acc = self.accelerator
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        mine = {"rank": acc.process_index, "world_size": acc.num_processes, "step": self.step,
                "first_batch": self._first_batch,
                "params": None if sharded else parameter_checksum(acc.unwrap_model(self.model)),
                "tokenizer": vocab_checksum(self.tokenizer)}
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            ranks = sorted(gather_object([mine]), key=lambda r: r["rank"])
        else:
            ranks = [mine]
        if acc.is_main_process:
            (self.run_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))
            if not sharded and len({r["params"] for r in ranks}) > 1:
                log.error("parameters differ across processes at step %d: %s", self.step,
                          [r["params"][:12] for r in ranks])
        return ranks


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """A short SHA-256 of a tensor's values (e.g. a batch's input_ids)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def parameter_checksum(model) -> str:
    """SHA-256 over every parameter's name and bytes, in ``named_parameters`` order."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def vocab_checksum(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()


def _collator_state_to_json(state: dict) -> dict:
    version, internal, gauss = state["rng"]
    return {"rng": [version, list(internal), gauss]}


def _collator_state_from_json(state: dict) -> dict:
    version, internal, gauss = state["rng"]
    return {"rng": (version, tuple(internal), gauss)}


FINETUNED_FORMAT_FILE = "paradec_training.json"


def write_finetuned_format(model_dir: Path, row_format: str) -> None:
    """Record beside a trained model the ``collator.format`` it was trained on (evaluation then
    asks the unpatched modes in the plain format the model learned, not its chat template)."""
    (Path(model_dir) / FINETUNED_FORMAT_FILE).write_text(json.dumps({"format": row_format}))


def finetuned_format(model_path) -> str | None:
    """The ``collator.format`` a paradec-trained model records (None: not trained by paradec)."""
    marker = Path(model_path) / FINETUNED_FORMAT_FILE if model_path else None
    if marker is None or not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("format")


def apply_optimizer_settings(optimizer, scheduler, cfg: TrainerConfig) -> None:
    """Set ``cfg``'s peak lr, betas and weight decay on a restored optimizer and schedule (a
    restored state would otherwise keep the checkpoint's)."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["initial_lr"] = cfg.lr
        if i == 0:  # the matrices; the 1-D parameters never decay (make_optimizer)
            group["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * schedule(scheduler.last_epoch)


# Settings a resumed run may change freely: they decide how the run is watched, saved and
# evaluated, not what it computes.
FREE_ON_RESUME = ("trainer.resume", "trainer.overwrite", "trainer.allow_changes",
                  "trainer.progress", "trainer.log_every", "trainer.eval_every",
                  "trainer.eval_batches", "trainer.save_every", "trainer.keep_checkpoints",
                  "trainer.threads", "logger.", "eval.", "generate.", "bench.", "pipeline.")
# Settings a resumed run cannot change: the weights, tokenizer and 2D RoPE come from the checkpoint.
FIXED_ON_RESUME = ("model.",)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_resume_settings(saved: dict, now: dict, allowed: list, checkpoint: Path) -> list[str]:
    """The settings that differ between a checkpoint's config and this run's; an error naming
    them unless every one is free, or allowed by ``trainer.allow_changes`` and applicable.
    Returns the differing keys that apply (for the log)."""
    old, new = _flatten(saved or {}), _flatten(now)
    differ = sorted(k for k in old.keys() | new.keys()
                    if old.get(k) != new.get(k) and not k.startswith(FREE_ON_RESUME))
    fixed = [k for k in differ if k.startswith(FIXED_ON_RESUME)]
    refused = fixed + [k for k in differ if k not in fixed and k not in allowed
                       and not any(k.startswith(a + ".") for a in allowed)]

    def show(keys):
        return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:6]) + (
            f" (and {len(keys) - 6} more)" if len(keys) > 6 else "")

    if fixed:
        raise ValueError(f"trainer.resume: checkpoint {checkpoint} holds the model, so these "
                         f"settings cannot change: {show(fixed)}; drop them, or start a new run")
    if refused:
        raise ValueError(f"trainer.resume: checkpoint {checkpoint} was trained with other "
                         f"settings: {show(refused)}; resuming with them changes the run: use the "
                         f"checkpoint's values, or allow them with trainer.allow_changes=["
                         f"{','.join(refused)}]")
    return differ


def resolve_resume(resume: str, run_dir: Path, run_id: str | None = None) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest intact checkpoint of the run that owns this run
    dir (``run_id``; None = any), or None; a path -> that checkpoint, verified."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        found = ckpt.latest_checkpoint(Path(run_dir) / "checkpoints", run_id)
        if found is None:
            log.info("trainer.resume=auto: no intact checkpoint of this run in %s, starting "
                     "fresh", run_dir)
        return found
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"trainer.resume={resume}: not a checkpoint directory")
    problem = ckpt.checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"trainer.resume={resume}: the checkpoint is damaged: {problem}")
    return path


class Interrupted(Exception):
    """Training stopped by a signal at a step boundary, after saving a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = int(signum), step, checkpoint
        name = signal.Signals(self.signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "a checkpoint"
        super().__init__(f"stopped by {name} at step {step}; {where} saved: continue with "
                         "trainer.resume=auto")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignal:
    """While active, SIGINT and SIGTERM only record that a stop was asked for; the loop then
    checkpoints at the next step boundary (in the main thread only, where signals arrive)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame):
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def shared_run_dir(state, run_dir: Path) -> Path:
    """The main process's run dir, on every process (``state``: an ``Accelerator`` or an
    accelerate ``PartialState``).

    Under ``accelerate launch`` / ``torchrun`` each process composes its own Hydra config, so a
    ``${now:...}`` run dir can differ by a second between processes; checkpoints, resume,
    ``model/`` and ``eval.json`` must all use the main process's one.
    """
    run_dir = Path(run_dir)
    if state.num_processes == 1:
        return run_dir
    from accelerate.utils import broadcast_object_list

    shared = broadcast_object_list([str(run_dir)], from_process=0)[0]
    if shared != str(run_dir):
        log.warning("process %d: using the main process's run dir %s instead of %s (pass "
                    "hydra.run.dir=... to give every process the same one)",
                    state.process_index, shared, run_dir)
    return Path(shared)


def make_accelerator(cfg: TrainerConfig) -> Accelerator:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    acc = Accelerator(mixed_precision=mixed_precision(cfg.mixed_precision),
                      cpu=not torch.cuda.is_available())
    set_seed(cfg.seed + acc.process_index)
    return acc
