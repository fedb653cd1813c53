"""Learning-rate groups by parameter name, and the 80% step schedule of configs/common."""
import logging
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.solver import LRMultiplier
from torch import nn

from deformable_family.engine import param_groups as param_groups_module
from deformable_family.engine import param_groups_by_name

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "common")


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Linear(2, 2)
        self.backbone.input_proj = nn.Linear(2, 2)
        self.attn = nn.Module()
        self.attn.sampling_offsets = nn.Linear(2, 2)
        self.reference_points = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _lr_of(optimizer, param):
    return next(g["lr"] for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_config_optimizer_applies_the_authors_multipliers():
    cfg = LazyConfig.load(os.path.join(CONFIGS, "optim.py"))
    model = _Toy()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert _lr_of(optimizer, model.backbone.body.weight) == pytest.approx(2e-5)
    assert _lr_of(optimizer, model.attn.sampling_offsets.bias) == pytest.approx(2e-5)
    assert _lr_of(optimizer, model.reference_points.weight) == pytest.approx(2e-5)
    assert _lr_of(optimizer, model.backbone.input_proj.weight) == pytest.approx(2e-4)
    assert _lr_of(optimizer, model.norm.weight) == pytest.approx(2e-4)
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in optimizer.param_groups)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert not any(p is model.frozen.weight for p in params)
    assert len(params) == len({id(p) for p in params}) == 10


def test_lr_override_reaches_every_group():
    cfg = LazyConfig.load(os.path.join(CONFIGS, "optim.py"))
    cfg = LazyConfig.apply_overrides(cfg, ["optimizer.lr=1e-3", "optimizer.weight_decay=0.05"])
    model = _Toy()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert _lr_of(optimizer, model.backbone.body.weight) == pytest.approx(1e-4)
    assert _lr_of(optimizer, model.backbone.input_proj.weight) == pytest.approx(1e-3)
    assert all(g["weight_decay"] == pytest.approx(0.05) for g in optimizer.param_groups)


def test_first_matching_key_wins_and_bad_input_is_named():
    model = _Toy()
    groups = param_groups_by_name(model, 1.0, {"backbone": 0.5, "backbone.body": 0.1})
    lrs = {g["lr"] for g in groups if any(p is model.backbone.body.weight for p in g["params"])}
    assert lrs == {0.5}
    with pytest.raises(ValueError, match="base_lr"):
        param_groups_by_name(model, 0.0)
    with pytest.raises(ValueError, match="lr_multipliers"):
        param_groups_by_name(model, 1.0, {"x": -1})
    with pytest.raises(TypeError, match="model"):
        param_groups_by_name("model", 1.0)


@pytest.mark.parametrize("max_iter", [10, 500])
def test_schedule_drops_at_80_percent_of_any_max_iter(max_iter):
    cfg = LazyConfig.load(os.path.join(CONFIGS, "schedule.py"))
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), max_iter)
    lrs = []
    for _ in range(max_iter):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    drop = int(0.8 * max_iter)
    assert lrs[:drop] == pytest.approx([1.0] * drop)
    assert lrs[drop:] == pytest.approx([0.1] * (max_iter - drop))



class _Warnings(logging.Handler):
    """The WARNING records of param_groups_by_name's logger (attached to it directly: detectron2's
    setup_logger stops the "deformable_family" logger's propagation once a run was set up)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger(param_groups_module.__name__).addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        logging.getLogger(param_groups_module.__name__).removeHandler(self)


def test_two_stage_quickstart_optimizer_warns_about_nothing():
    # The two-stage model has no reference-point projection: the recipe's key for it is optional.
    cfg = LazyConfig.load(os.path.join(CONFIGS, "..", "quickstart", "deformable_detr_shapes.py"))
    model = instantiate(cfg.model)
    names = [name for name, _ in model.named_parameters()]
    assert model.two_stage and not any("reference_points" in name for name in names)
    cfg.optimizer.params.model = model
    with _Warnings() as warnings:
        instantiate(cfg.optimizer)
    assert warnings == []


def test_key_matching_nothing_is_warned_unless_optional():
    model = _Toy()
    del model.reference_points
    multipliers = {"sampling_offsets": 0.1, "reference_points": 0.1, "sampling_ofsets": 0.1}
    with _Warnings() as warnings:
        param_groups_by_name(
            model, 1.0, multipliers, optional_lr_multiplier_keys=["reference_points"]
        )
    assert len(warnings) == 1 and "'sampling_ofsets'" in warnings[0] and "spelling" in warnings[0]
    with _Warnings() as warnings:
        param_groups_by_name(model, 1.0, multipliers)
    assert len(warnings) == 2
    with pytest.raises(TypeError, match="optional_lr_multiplier_keys"):
        param_groups_by_name(
            model, 1.0, multipliers, optional_lr_multiplier_keys="reference_points"
        )
