"""bfloat16 autocast on the CPU (train.amp.enabled=True, train.device="cpu"): a few training steps
of a small Deformable DETR give the float32 losses within a stated tolerance."""

import copy
import itertools
import os
import sys

import pytest
import torch
from detectron2.config import instantiate

from deformable_family.engine import DetrCPUAutocastTrainer, build_trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "modeling"))
from test_deformable_detr import make_batch, tiny_model_config  # noqa: E402

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %); through a transformer the
# losses of the first steps stay within 1 % of float32's (measured on this small model: 0.04 %).
LOSS_RTOL = 0.01
STEPS = 3


def _losses_of_run(amp: bool):
    torch.manual_seed(0)
    model = instantiate(tiny_model_config("multi_scale"))  # dropout 0.1, as the COCO configs
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(0)
    trainer = build_trainer(model, itertools.repeat(batch), optimizer, amp=amp, device="cpu")
    losses = []
    model.register_forward_hook(
        lambda module, inputs, outputs: losses.append(float(sum(outputs.values())))
    )
    torch.manual_seed(1)  # the same dropout masks in both runs
    trainer.train(0, STEPS)
    return trainer, losses


def test_bfloat16_autocast_losses_follow_float32():
    fp32_trainer, fp32 = _losses_of_run(amp=False)
    bf16_trainer, bf16 = _losses_of_run(amp=True)
    assert not isinstance(fp32_trainer, DetrCPUAutocastTrainer)
    assert isinstance(bf16_trainer, DetrCPUAutocastTrainer)
    assert len(fp32) == len(bf16) == STEPS
    # autocast really ran (bfloat16 rounding changes the losses) ...
    assert fp32 != bf16
    # ... and the losses stay close to float32's over the steps.
    for step, (a, b) in enumerate(zip(fp32, bf16)):
        assert b == pytest.approx(a, rel=LOSS_RTOL), f"step {step}: fp32 {a}, bf16 {b}"
    # weights stay float32.
    assert all(p.dtype == torch.float32 for p in bf16_trainer.model.parameters())


def test_cpu_amp_takes_only_bfloat16():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="bfloat16"):
        build_trainer(
            model,
            [],
            torch.optim.SGD(model.parameters(), lr=0.1),
            amp=True,
            device="cpu",
            amp_dtype="float16",
        )
