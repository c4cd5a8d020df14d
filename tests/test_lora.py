"""LoRA through paradec's loop: only the adapter trains, it matches a plain peft reference loop,
and save / load / merge round trips give identical logits."""

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from paradec import models
from paradec.collator import ColumnarCollator
from paradec.config import LoraSettings, TrainerConfig
from paradec.layout import build_layout
from paradec.masks import columnar_mask
from paradec.models import forward_layout
from paradec.training import Trainer
from tests.test_training_parts import NullTracker, qa_items
from tests.tiny import tiny_model

peft = pytest.importorskip("peft")
LORA = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0)


def lora_model(tmp_path, seed=1):
    base = tiny_model(pair_indices=[7, 8], init=0.02, seed=seed)
    base_dir = models.save_model(base, None, tmp_path / "base")
    return models.add_lora(base, LORA, base_dir), base_dir


def trainer_cfg(steps):
    # constant lr, no decay, no clipping: the reference loop below is plain AdamW
    return TrainerConfig(max_steps=steps, batch_size=4, lr=5e-3, warmup_steps=0, min_lr_ratio=1.0,
                         weight_decay=0.0, grad_clip=0, eval_every=0, progress=False)


def test_only_the_adapter_trains(tmp_path):
    model, _ = lora_model(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = Trainer(model=model, tokenizer=None, train_data=qa_items(), val_data=None,
                      collator=ColumnarCollator(), cfg=trainer_cfg(3), run_dir=tmp_path,
                      accelerator=Accelerator(cpu=True), tracker=NullTracker())
    for _ in range(3):
        trainer.train_step()
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(p, before[name]), f"base weight {name} changed"
    changed = [n for n, p in trainer.model.named_parameters()
               if "lora_" in n and not torch.equal(p, adapters[n])]
    assert changed, "the adapter did not train"


def test_losses_match_a_plain_peft_reference_loop(tmp_path):
    steps = 5
    model, _ = lora_model(tmp_path / "a")
    torch.manual_seed(0)
    trainer = Trainer(model=model, tokenizer=None, train_data=qa_items(24), val_data=None,
                      collator=ColumnarCollator(), cfg=trainer_cfg(steps), run_dir=tmp_path,
                      accelerator=Accelerator(cpu=True), tracker=NullTracker())
    ours = [trainer.train_step()["train/loss"] for _ in range(steps)]

    # The reference: peft + torch, written out by hand, same data order, same optimiser.
    ref_model, _ = lora_model(tmp_path / "b")
    opt = torch.optim.AdamW([p for p in ref_model.parameters() if p.requires_grad], lr=5e-3,
                            betas=(0.9, 0.95), weight_decay=0.0)
    data = qa_items(24)  # one epoch covers the 5 steps
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    ref = []
    ref_model.train()
    for step in range(steps):
        batch = [data[i] for i in order[step * 4:(step + 1) * 4]]
        lay = build_layout(batch)
        mask = columnar_mask(lay.column, lay.valid)
        logits = ref_model(input_ids=lay.input_ids, position_ids=lay.pos2d,
                           attention_mask=mask).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lay.labels.reshape(-1),
                               ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    for a, b in zip(ours, ref):
        assert a == pytest.approx(b, rel=0.01)
    assert ours[-1] < ours[0]


def test_save_load_and_merge_round_trips(tmp_path):
    model, base_dir = lora_model(tmp_path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter
    model.eval()
    lay = build_layout(qa_items(3, seed=4))
    with torch.no_grad():
        want = forward_layout(model, lay).logits
    out = models.save_model(model, None, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file()
    assert models.adapter_base(out) == str(base_dir)
    loaded, _ = models.load_pretrained(out)
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(forward_layout(loaded, lay).logits, want, atol=1e-5)
    assert models.saved_columnar_settings(out) == {"pair_indices": [7, 8], "branch_stride": 128}
    merged = models.merge_lora(loaded)
    merged_dir = models.save_model(merged, None, tmp_path / "merged")
    reloaded, _ = models.load_pretrained(merged_dir)
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(forward_layout(reloaded, lay).logits, want, atol=1e-4)
