"""Pieces of the training loop: schedule, resumable batches, atomic checkpoints, accumulation."""

import math

import pytest
import torch
from accelerate import Accelerator

from paradec import checkpoint as ckpt
from paradec.batches import BatchStream
from paradec.collator import ColumnarCollator
from paradec.config import TrainerConfig
from paradec.layout import Branch, BranchSample
from paradec.training import Trainer, lr_lambda, resolve_resume
from tests.tiny import tiny_model


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    lam = [lr_lambda(s, warmup=10, total=100, min_ratio=0.1) for s in range(101)]
    assert lam[0] == pytest.approx(0.1) and lam[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lam[:10], lam[1:10]))
    assert all(a >= b for a, b in zip(lam[10:], lam[11:]))
    assert lam[100] == pytest.approx(0.1)
    assert lam[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_batch_stream_resumes_exactly_and_reshuffles_per_epoch():
    data = list(range(10))
    a = BatchStream(data, 3, seed=5)
    seen = [next(a) for _ in range(4)]  # crosses an epoch boundary (3 batches per epoch)
    assert len(set(sum(seen[:3], []))) == 9  # an epoch never repeats an item
    assert a.epoch == 1 and seen[3] != seen[0]  # the next epoch has its own order
    state = a.state_dict()
    rest = [next(a) for _ in range(5)]
    b = BatchStream(data, 3, seed=5)
    b.load_state_dict(state)
    assert [next(b) for _ in range(5)] == rest


def test_batch_stream_shards_ranks_disjointly():
    data = list(range(12))
    r0 = next(BatchStream(data, 6, seed=1, rank=0, world_size=2))
    r1 = next(BatchStream(data, 6, seed=1, rank=1, world_size=2))
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 6


def test_batch_stream_iterable_resume():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(7))

    a = BatchStream(Stream(), 2)
    first = [next(a) for _ in range(4)]  # 3 full batches per pass, then a new pass
    assert first == [[0, 1], [2, 3], [4, 5], [0, 1]]
    b = BatchStream(Stream(), 2)
    b.load_state_dict({"epoch": 0, "position": 2})
    assert next(b) == [4, 5]


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchStream([1, 2], 3)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model=model, tokenizer=None, optimizer=opt,
                             scheduler=sched, trainer_state={"data": {}}, keep_last=2)
    (tmp_path / ".tmp-step_0000009").mkdir()  # a write killed half-way
    (tmp_path / "step_0000010").with_suffix(".partial").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000003"
    state = ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path), opt, sched)
    assert state["step"] == 3
    files = {p.name for p in (tmp_path / "step_0000003" / "model").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)


def test_resume_option(tmp_path):
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    with pytest.raises(FileNotFoundError, match="trainer.resume"):
        resolve_resume(str(tmp_path), tmp_path)


def qa_items(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(2, 61, (k,), generator=g).tolist()  # noqa: E731
    return [BranchSample(rand(5), [Branch(rand(2), rand(3) + [1]) for _ in range(2)])
            for _ in range(n)]


class NullTracker:
    run_id = None

    def __init__(self):
        self.logged = []

    def log(self, metrics, step=None):
        self.logged.append((step, metrics))

    def summary(self, metrics):
        pass


def run_trainer(tmp_path, batch_size, grad_accum, steps=3):
    model = tiny_model(pair_indices=[7, 8], init=0.02, seed=1)
    cfg = TrainerConfig(max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
                        warmup_steps=0, eval_every=0, progress=False, grad_clip=0)
    trainer = Trainer(model=model, tokenizer=None, train_data=qa_items(), val_data=None,
                      collator=ColumnarCollator(), cfg=cfg, run_dir=tmp_path,
                      accelerator=Accelerator(cpu=True), tracker=NullTracker())
    losses = [trainer.train_step()["train/loss"] for _ in range(steps)]
    return trainer, losses


def test_accumulation_is_normalised_by_the_steps_target_tokens(tmp_path):
    """8 samples in one micro-batch or 2 x 4 with accumulation: the same update."""
    one, losses_one = run_trainer(tmp_path / "a", batch_size=8, grad_accum=1)
    two, losses_two = run_trainer(tmp_path / "b", batch_size=4, grad_accum=2)
    assert losses_one == pytest.approx(losses_two, abs=1e-5)
    assert losses_one[-1] < losses_one[0]  # it learns
    for (name, p1), p2 in zip(one.model.named_parameters(), two.model.parameters()):
        assert torch.allclose(p1, p2, atol=1e-5), name


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen3_moe", "lora"])
def test_labelled_loss_matches_the_loss_over_full_logits(tmp_path, arch):
    """Projecting only labelled positions gives the same loss and gradients as projecting all."""
    from paradec.config import LoraSettings
    from paradec.loss import columnar_loss
    from paradec.models import add_lora, forward_layout
    from paradec.training import labelled_loss

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
               router_aux_loss_coef=0.01) \
        if arch == "qwen3_moe" else {}
    model = tiny_model("qwen3" if arch == "lora" else arch, pair_indices=[7, 8], seed=3, **moe)
    if arch == "lora":
        model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), tmp_path / "base")
    model.train()
    layout = ColumnarCollator(min_branches_per_sample=1, max_branches_per_sample=2)(qa_items(6))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    full, full_grads = loss_and_grads(lambda: columnar_loss(
        forward_layout(model, layout).logits, layout.labels, reduction="sum")[0])
    kept, kept_grads = loss_and_grads(lambda: labelled_loss(model, layout)[1])
    assert torch.allclose(full, kept, rtol=1e-5)
    for a, b in zip(full_grads, kept_grads):
        assert torch.allclose(a, b, atol=1e-5)
    outputs, _, n_tokens = labelled_loss(model, layout)
    assert outputs.logits.shape[0] == int(n_tokens) == layout.num_target_tokens


def test_validation_loss_is_the_target_loss_whatever_loss_on_trains(tmp_path):
    """collator.loss_on=all trains backgrounds and prompts too; val/loss stays the answers' loss."""
    def val_loss(loss_on):
        model = tiny_model(pair_indices=[7, 8], init=0.5, seed=1)
        cfg = TrainerConfig(max_steps=1, batch_size=4, eval_batches=2, progress=False)
        trainer = Trainer(model=model, tokenizer=None, train_data=qa_items(),
                          val_data=qa_items(8, 1), collator=ColumnarCollator(loss_on=loss_on),
                          cfg=cfg, run_dir=tmp_path / loss_on, accelerator=Accelerator(cpu=True),
                          tracker=NullTracker())
        return trainer.validate()["val/loss"]

    assert val_loss("all") == pytest.approx(val_loss("target"), rel=1e-6)
