"""The Deformable DETR configs load, build, and reproduce the authors' parameter counts."""

import glob
import math
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG_DIR = os.path.join(ROOT, "configs", "deformable_detr")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))

# The authors' counts (p.numel() over all parameters of their models with 91-way class heads; frozen
# BatchNorm statistics are buffers), from the reference notes.
AUTHORS_PARAMETERS = {
    "deformable_detr_r50_single_scale_50ep.py": 34066593,
    "deformable_detr_r50_50ep.py": 40069665,
    "deformable_detr_r50_box_refine_50ep.py": 40849660,
    "deformable_detr_r50_two_stage_50ep.py": 41181529,
}
AUTHORS_TRAINABLE_MULTI_SCALE = 39847265


def build_on_meta(config_name: str, **overrides):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, config_name))
    cfg = LazyConfig.apply_overrides(cfg, [f"{key}={value}" for key, value in overrides.items()])
    # The meta device allocates no memory: building R50/R101 stays fast.
    with torch.device("meta"):
        return cfg, instantiate(cfg.model)


def count(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_all_eight_configs_present():
    names = {os.path.basename(path) for path in CONFIGS}
    for depth in ("r50", "r101"):
        for variant in ("_single_scale", "", "_box_refine", "_two_stage"):
            assert f"deformable_detr_{depth}{variant}_50ep.py" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_with_expected_variant(path):
    name = os.path.basename(path)
    cfg, model = build_on_meta(name)
    for key in ("dataloader", "optimizer", "lr_multiplier", "train", "model"):
        assert key in cfg
    assert cfg.train.init_checkpoint == ""
    assert cfg.dataloader.train.total_batch_size == 32
    # 50 epochs of the 118,287 train2017 images (empty ones kept, as the authors) at batch 32.
    assert cfg.dataloader.train.dataset.filter_empty is False
    assert cfg.train.max_iter == math.ceil(50 * 118287 / 32)
    assert model.num_classes == 80 and model.criterion.num_classes == 80
    assert model.two_stage == ("two_stage" in name)
    assert model.with_box_refine == ("two_stage" in name or "box_refine" in name)
    assert model.transformer.num_levels == (1 if "single_scale" in name else 4)
    num_res4_blocks = len(model.backbone.body.res4)
    assert num_res4_blocks == (23 if "r101" in name else 6)


def test_parameter_names_match_optimizer_groups():
    cfg, model = build_on_meta("deformable_detr_r50_50ep.py")
    names = [name for name, _ in model.named_parameters()]
    for substring in cfg.optimizer.params.lr_multipliers:
        assert any(substring in name for name in names), substring
    assert any(name.startswith("backbone.input_proj.") for name in names)
    # The projections must not fall into the backbone's reduced-lr group.
    assert not any("input_proj" in name and "backbone.body." in name for name in names)


@pytest.mark.parametrize("config_name", sorted(AUTHORS_PARAMETERS))
def test_parameter_count_matches_authors(config_name):
    # One override: the two-stage proposal head follows model.num_classes, as the authors' does.
    _, model = build_on_meta(config_name, **{"model.num_classes": 91})
    assert count(model) == AUTHORS_PARAMETERS[config_name]


def test_trainable_count_matches_authors_multi_scale():
    _, model = build_on_meta("deformable_detr_r50_50ep.py", **{"model.num_classes": 91})
    assert count(model, trainable_only=True) == AUTHORS_TRAINABLE_MULTI_SCALE


def test_binary_proposal_head_differs_only_by_unused_rows():
    name = "deformable_detr_r50_two_stage_50ep.py"
    _, binary = build_on_meta(name, **{"model.num_classes": 91, "model.proposal_num_classes": 1})
    d_model = binary.transformer.d_model
    assert binary.proposal_class_embed.out_features == 1
    # 90 dropped rows of (weight d_model + bias 1).
    assert count(binary) == AUTHORS_PARAMETERS[name] - 90 * (d_model + 1)


def test_one_d_model_override_changes_every_size():
    """The common model config interpolates every width from model.transformer.d_model."""
    _, model = build_on_meta("deformable_detr_r50_two_stage_50ep.py", **{"model.transformer.d_model": 128})
    assert model.position_embedding.num_pos_feats == 64
    assert all(shape.channels == 128 for shape in model.backbone.output_shape().values())
    assert model.transformer.encoder.layers[0].self_attn.d_model == 128
    assert model.transformer.decoder.layers[0].cross_attn.d_model == 128
    assert model.class_embed[0].in_features == model.proposal_class_embed.in_features == 128
