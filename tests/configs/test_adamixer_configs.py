"""The AdaMixer / StageInteractor configs load, build and carry the authors' recipes."""
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T

from deformable_family.data import RandomSelect

CONFIGS = {
    "configs/adamixer/adamixer_r50_1x.py": ("adamixer", 50, 100, "1x"),
    "configs/adamixer/adamixer_r50_3x.py": ("adamixer", 50, 300, "3x"),
    "configs/adamixer/adamixer_r101_3x.py": ("adamixer", 101, 300, "3x"),
    "configs/stageinteractor/stageinteractor_r50_1x.py": ("stageinteractor", 50, 100, "1x"),
    "configs/stageinteractor/stageinteractor_r50_3x.py": ("stageinteractor", 50, 300, "3x"),
    "configs/stageinteractor/stageinteractor_r101_3x.py": ("stageinteractor", 101, 300, "3x"),
}
ITERATIONS_PER_EPOCH = 7330  # ceil(117,266 train2017 images with annotations / 16)


@pytest.mark.parametrize("path", sorted(CONFIGS), ids=os.path.basename)
def test_config_builds_with_the_authors_recipe(path):
    family, depth, num_queries, schedule = CONFIGS[path]
    cfg = LazyConfig.load(path)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.num_queries == num_queries and model.select_topk == num_queries
    assert len(model.backbone.body.res4) == (23 if depth == 101 else 6)
    assert [s.stride for s in model.backbone.output_shape().values()] == [4, 8, 16, 32]
    assert model.backbone.norm_eval and model.backbone.shared_norm is not None
    assert len(model.stages) == 6 and model.size_divisibility == 32
    is_si = family == "stageinteractor"
    assert model.criterion.cross_stage_iou_threshold == (0.5 if is_si else None)
    assert (
        model.criterion.l1_box_format == "xyxy" and model.criterion.matcher.l1_box_format == "xyxy"
    )
    assert model.criterion.weight_dict == {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert model.stages[0].per_axis_box_delta == is_si

    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.dataloader.train.dataset.filter_empty is True
    assert cfg.optimizer.lr == 2.5e-5 and cfg.optimizer.weight_decay == 1e-4
    assert dict(cfg.optimizer.params.lr_multipliers) == {}
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.max_norm == 1.0
    epochs = 12 if schedule == "1x" else 36
    assert cfg.train.max_iter == epochs * ITERATIONS_PER_EPOCH
    scheduler = instantiate(cfg.lr_multiplier)
    steps = [8, 11] if schedule == "1x" else [24, 33]
    max_iter = cfg.train.max_iter
    # Linear warm-up over 500 iterations from 0.001 x lr, then x0.1 after each step epoch.
    assert scheduler(0.0) == pytest.approx(0.001)
    assert scheduler(250 / max_iter) == pytest.approx(0.001 + 0.999 * 0.5, rel=1e-3)
    assert scheduler(600 / max_iter) == pytest.approx(1.0)
    assert scheduler((steps[0] - 0.01) / epochs) == pytest.approx(1.0)
    assert scheduler((steps[0] + 0.01) / epochs) == pytest.approx(0.1)
    assert scheduler((steps[1] + 0.01) / epochs) == pytest.approx(0.01)

    augmentations = instantiate(cfg.dataloader.train.mapper.augmentations)
    if schedule == "1x":
        resize = [a for a in augmentations if isinstance(a, T.ResizeShortestEdge)]
        assert (
            len(resize) == 1
            and resize[0].short_edge_length == (800, 800)
            and resize[0].max_size == 1333
        )
    else:
        flip, select = augmentations
        assert isinstance(flip, T.RandomFlip) and isinstance(select, RandomSelect)
        pre_resize = select.second.augs[0]
        assert pre_resize.short_edge_length == [400, 500, 600] and pre_resize.max_size == 1333


def test_num_classes_override_reaches_every_stage_and_the_criterion():
    cfg = LazyConfig.load("configs/stageinteractor/stageinteractor_r50_1x.py")
    cfg = LazyConfig.apply_overrides(
        cfg, ["model.num_classes=20", "model.stages.d_model=128", "model.stages.num_stages=2"]
    )
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.criterion.num_classes == 20
    assert all(stage.class_head[-1].out_features == 20 for stage in model.stages)
    assert all(shape.channels == 128 for shape in model.backbone.output_shape().values())


@pytest.mark.parametrize(
    "path",
    ["configs/quickstart/adamixer_shapes.py", "configs/quickstart/stageinteractor_shapes.py"],
)
def test_quickstart_configs_build(path):
    cfg = LazyConfig.load(path)
    model = instantiate(cfg.model)
    assert model.num_classes == 5 and cfg.train.device == "cpu"
    assert not model.backbone.norm_eval and all(p.requires_grad for p in model.parameters())
