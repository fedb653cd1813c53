"""AdaMixer / StageInteractor meta-architecture: parameter counts of the authors' R50 models, training
and inference on CPU with tiny inputs, padding, configuration errors."""
import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from deformable_family.modeling.adamixer import AdaMixer, adamixer_stages, stageinteractor_stages
from deformable_family.modeling.backbones import MultiScaleResNet

from test_deformable_detr import make_batch, randomize_zero_inits  # noqa: E402 (same folder)

CONFIGS = {
    "adamixer": "configs/common/models/adamixer.py",
    "stageinteractor": "configs/common/models/stageinteractor.py",
}

# The authors' R50 models with 100 queries and 80 classes (shared/reference/adamixer_stageinteractor.md),
# as (total, trainable, head = neck + query generator + decoder).
REFERENCE = {
    "adamixer": (134_790_904, 134_565_560, 111_282_872),
    "stageinteractor": (137_277_256, 137_051_912, 113_769_224),
}
# What this implementation leaves out, as dead in the authors' models: AdaMixer's initial box is a
# 100 x 4 nn.Embedding that is detached in use (a buffer here); StageInteractor's subbox_score_list
# (stages 2-5: 1 + 2 + 3 + 4 layers of 256 x 128 + 128) feeds a softmax over an axis of length 1,
# whose output is identically 1.
DEAD = {"adamixer": 400, "stageinteractor": 10 * (256 * 128 + 128)}
REFERENCE_STAGES = {
    "adamixer": [18_378_716] * 6,
    "stageinteractor": [22_718_932, 18_495_908, 17_047_972, 17_606_692, 18_165_412, 18_724_132],
}
DEAD_PER_STAGE = {"adamixer": [0] * 6, "stageinteractor": [0, 0, 32_896, 65_792, 98_688, 131_584]}


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_counts_equal_the_authors_r50_minus_dead_parameters(name):
    with torch.device("meta"):
        model = instantiate(LazyConfig.load(CONFIGS[name]).model)
    total, trainable, head = REFERENCE[name]
    assert count(model.parameters()) == total - DEAD[name]
    assert count(p for p in model.parameters() if p.requires_grad) == trainable - DEAD[name]
    assert count(model.parameters()) - count(model.backbone.body.parameters()) == head - DEAD[name]
    per_stage = [count(stage.parameters()) for stage in model.stages]
    assert per_stage == [r - d for r, d in zip(REFERENCE_STAGES[name], DEAD_PER_STAGE[name])]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_300_queries_and_r101_counts(name):
    """300 queries add 200 x 256 content parameters; R101 adds 18,993,128 backbone parameters
    (reference: 134,842,904 / 153,783,032 for AdaMixer, 137,328,456 / 156,269,384 for
    StageInteractor, minus the dead parameters; AdaMixer's dead box embedding grows with N)."""
    cfg = LazyConfig.load(CONFIGS[name]).model
    cfg.num_queries = 300
    with torch.device("meta"):
        model = instantiate(cfg)
    expected = {"adamixer": 134_842_904 - 1200, "stageinteractor": 137_328_456 - DEAD[name]}[name]
    assert count(model.parameters()) == expected
    cfg = LazyConfig.load(CONFIGS[name]).model
    cfg.backbone.depth = 101
    with torch.device("meta"):
        model = instantiate(cfg)
    expected = {"adamixer": 153_783_032 - 400, "stageinteractor": 156_269_384 - DEAD[name]}[name]
    assert count(model.parameters()) == expected


def tiny_config(name: str, num_stages: int = 3):
    cfg = LazyConfig.load(CONFIGS[name]).model
    cfg.backbone.depth = 18
    cfg.stages.d_model = 64
    cfg.stages.num_heads = 4
    cfg.stages.ffn_dim = 128
    cfg.stages.num_stages = num_stages
    cfg.stages.out_points = 8
    if name == "adamixer":
        cfg.stages.num_points = 4
    else:
        cfg.stages.num_points = 4
        cfg.stages.first_stage_num_points = 8
        cfg.stages.fine_points = 2
    cfg.num_queries = 10
    return cfg


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_every_trainable_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = instantiate(tiny_config(name))
    randomize_zero_inits(model)
    model.train()
    losses = model(make_batch())
    stages = len(model.stages)
    expected = {
        f"{loss}{suffix}"
        for loss in ("loss_class", "loss_bbox", "loss_giou")
        for suffix in [""] + [f"_{i}" for i in range(stages - 1)]
    }
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []
    assert not any(p.grad is not None for p in model.backbone.body.stem.parameters())


def test_boxes_are_detached_between_stages_in_training():
    """The gradient of a stage's boxes stops at its input boxes: the last stage's box loss does not
    reach the first stage's box head (the content path still reaches its attention)."""
    torch.manual_seed(0)
    model = instantiate(tiny_config("adamixer"))
    randomize_zero_inits(model)
    model.train()
    images = torch.randn(1, 3, 64, 64)
    outputs = model.forward_outputs(images, torch.zeros(1, 64, 64, dtype=torch.bool))
    outputs["pred_boxes"].sum().backward()
    assert all(
        p.grad is None or p.grad.abs().sum() == 0 for p in model.stages[0].box_head.parameters()
    )
    assert model.stages[0].self_attn.in_proj_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inference_returns_top_k_instances_in_output_size(name):
    torch.manual_seed(0)
    model = instantiate(tiny_config(name))
    randomize_zero_inits(model)
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        results = model(batch)
    for result, item in zip(results, batch):
        instances = result["instances"]
        assert instances.image_size == (item["height"], item["width"])
        assert 0 < len(instances) <= model.select_topk == 10
        boxes = instances.pred_boxes.tensor
        assert torch.all(boxes[:, 0::2] <= item["width"]) and torch.all(
            boxes[:, 1::2] <= item["height"]
        )
        assert torch.all(instances.scores[:-1] >= instances.scores[1:])
        assert instances.pred_classes.max() < 80


def test_initial_boxes_are_the_unpadded_image():
    model = instantiate(tiny_config("adamixer"))
    whwh = torch.tensor([[80.0, 64.0, 80.0, 64.0]])
    query, xyzr = model.initial_queries(whwh)
    assert query.shape == (1, 10, 64)
    torch.testing.assert_close(query.mean(-1), torch.zeros(1, 10), atol=1e-5, rtol=0)
    from deformable_family.modeling.adamixer import xyzr_to_xyxy

    torch.testing.assert_close(
        xyzr_to_xyxy(xyzr)[0],
        torch.tensor([[0.0, 0.0, 80.0, 64.0]]).repeat(10, 1),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_ignores_zero_padding(name):
    """The same maps alone, or zero-padded to a larger size (as the padded area of a batch is when
    it reads nothing), give the same outputs: positions are normalised by each map's pixel extent
    and the initial boxes use the unpadded image size. (Non-zero padding is read by samples near
    the border, as in the authors' code, and the backbone sees the padded image.)"""
    torch.manual_seed(0)
    model = instantiate(tiny_config(name))
    randomize_zero_inits(model)
    model.eval()
    strides = [4, 8, 16, 32]
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    padded_sizes = [(24, 32), (12, 16), (6, 8), (3, 4)]
    maps, padded_maps = [], []
    for (height, width), (padded_height, padded_width) in zip(sizes, padded_sizes):
        feature = torch.randn(1, 64, height, width)
        padded = torch.zeros(1, 64, padded_height, padded_width)
        padded[:, :, :height, :width] = feature
        maps.append(feature)
        padded_maps.append(padded)
    whwh = torch.tensor([[90.0, 60.0, 90.0, 60.0]])  # inside the 96 x 64 maps
    with torch.no_grad():
        alone = model.decode(maps, whwh)
        padded = model.decode(padded_maps, whwh)
    torch.testing.assert_close(padded["pred_logits"], alone["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded["pred_boxes"], alone["pred_boxes"], atol=1e-5, rtol=1e-5)
    assert strides == model.strides


def test_bad_configs_fail_at_construction():
    cfg = tiny_config("adamixer")
    cfg.stages.num_classes = 7
    with pytest.raises(ValueError, match="class logits"):
        instantiate(cfg)
    cfg = tiny_config("adamixer")
    cfg.backbone.out_channels = 32
    with pytest.raises(ValueError, match="d_model=64"):
        instantiate(cfg)
    with pytest.raises(ValueError, match="num_points"):
        adamixer_stages(num_points=0)
    with pytest.raises(ValueError, match="multiple of fine_points"):
        stageinteractor_stages(num_points=30, fine_points=8)
    with pytest.raises(ValueError, match="fewer coarse points"):
        stageinteractor_stages(num_points=32, first_stage_num_points=16, fine_points=8, reuse_start_stage=1)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        adamixer_stages(d_model=30, num_heads=2, num_groups=4)
    backbone = MultiScaleResNet(
        depth=18, in_features=["res2", "res3"], num_extra_levels=0, out_channels=64
    )
    small_stages = adamixer_stages(
        num_stages=1, d_model=64, num_heads=4, ffn_dim=64, num_points=2, out_points=2
    )
    mixed = list(small_stages) + list(
        adamixer_stages(
            num_stages=1,
            d_model=64,
            num_heads=4,
            ffn_dim=64,
            num_groups=2,
            num_points=2,
            out_points=2,
        )
    )
    with pytest.raises(ValueError, match="all stages must agree"):
        AdaMixer(backbone=backbone, stages=mixed, criterion=torch.nn.Identity())
    with pytest.raises(ValueError, match="input_format"):
        AdaMixer(
            backbone=backbone,
            stages=small_stages,
            criterion=torch.nn.Identity(),
            input_format="YUV",
        )
    with pytest.raises(ValueError, match="at least one"):
        AdaMixer(backbone=backbone, stages=[], criterion=torch.nn.Identity())


def test_model_registered():
    from detectron2.modeling import META_ARCH_REGISTRY

    assert META_ARCH_REGISTRY.get("AdaMixer") is AdaMixer
