"""Multi-scale ResNet backbone: levels, strides, freezing, initialisation, registry."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

from deformable_family.config import add_multiscale_resnet_config
from deformable_family.modeling.backbones import MultiScaleResNet


def test_multi_scale_levels_and_shapes():
    backbone = MultiScaleResNet(depth=18, out_channels=64)
    shapes = backbone.output_shape()
    assert [shape.stride for shape in shapes.values()] == [8, 16, 32, 64]
    assert all(shape.channels == 64 for shape in shapes.values())
    outputs = backbone(torch.randn(1, 3, 100, 130))
    assert list(outputs) == list(shapes)
    for name, feature in outputs.items():
        stride = shapes[name].stride
        # Each stride-2 conv rounds up.
        assert feature.shape[1] == 64
        assert abs(feature.shape[2] - 100 / stride) < 1 and abs(feature.shape[3] - 130 / stride) < 1


def test_single_scale_is_c5_only():
    backbone = MultiScaleResNet(depth=18, in_features=["res5"], num_extra_levels=0, out_channels=32)
    assert [shape.stride for shape in backbone.output_shape().values()] == [32]
    assert len(backbone.input_proj) == 1 and backbone.input_proj[0][0].kernel_size == (1, 1)


def test_stem_and_res2_frozen_and_batchnorm_frozen():
    backbone = MultiScaleResNet(depth=50)
    for name, parameter in backbone.body.named_parameters():
        assert parameter.requires_grad == (not name.startswith(("stem.", "res2."))), name
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.input_proj.parameters())


def test_stride_on_3x3_conv_and_neck_init():
    backbone = MultiScaleResNet(depth=50)
    first_block = backbone.body.res3[0]
    assert first_block.conv1.stride == (1, 1) and first_block.conv2.stride == (2, 2)
    c6 = backbone.input_proj[3][0]
    assert c6.kernel_size == (3, 3) and c6.stride == (2, 2) and c6.in_channels == 2048
    for projection in backbone.input_proj:
        conv, norm = projection
        assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 32
        assert conv.bias.abs().sum() == 0
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = (6.0 / (fan_in + fan_out)) ** 0.5  # xavier_uniform: U(-bound, bound)
        # Its spread, not only its bound: PyTorch's default (kaiming_uniform, a = sqrt(5)) draws
        # from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), inside the same bound but about half as wide
        # here. Over >= 262k draws the std of U(-b, b), b / sqrt(3), is within 1%.
        weight = conv.weight.detach()
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.01)


def test_yacs_builder_registered():
    assert "build_multiscale_resnet_backbone" in BACKBONE_REGISTRY
    cfg = get_cfg()
    add_multiscale_resnet_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.MULTISCALE_RESNET.OUT_CHANNELS = 64
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, MultiScaleResNet)
    assert [s.stride for s in backbone.output_shape().values()] == [8, 16, 32, 64]
    assert all(s.channels == 64 for s in backbone.output_shape().values())
    # The LazyConfig's torchvision layout, not detectron2's default STRIDE_IN_1X1=True.
    assert backbone.body.res3[0].conv1.stride == (1, 1) and backbone.body.res3[0].conv2.stride == (2, 2)
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.MULTISCALE_RESNET.NUM_EXTRA_LEVELS = 0
    assert [s.stride for s in build_backbone(cfg, ShapeSpec(channels=3)).output_shape().values()] == [32]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="depth"):
        MultiScaleResNet(depth=42)
    with pytest.raises(ValueError, match="in_features"):
        MultiScaleResNet(depth=18, in_features=["res6"])
    with pytest.raises(ValueError, match="in_features"):
        MultiScaleResNet(depth=18, in_features=["res5", "res3"])


def _adamixer_backbone(depth: int = 50, **overrides) -> MultiScaleResNet:
    kwargs = dict(
        depth=depth,
        in_features=["res2", "res3", "res4", "res5"],
        num_extra_levels=0,
        norm="BN",
        norm_eval=True,
        shared_norm=True,
    )
    kwargs.update(overrides)
    return MultiScaleResNet(**kwargs)


def test_shared_norm_is_one_groupnorm_applied_to_every_level():
    """AdaMixer's neck: per level a 1x1 conv with bias, then the same GroupNorm(32) module."""
    backbone = _adamixer_backbone(depth=18, out_channels=64)
    assert [shape.stride for shape in backbone.output_shape().values()] == [4, 8, 16, 32]
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms == [backbone.shared_norm] and backbone.shared_norm.num_groups == 32
    assert all(len(projection) == 1 for projection in backbone.input_proj)
    with torch.no_grad():
        backbone.shared_norm.weight.uniform_(0.5, 2.0)
        backbone.shared_norm.bias.normal_()
    backbone.eval()
    images = torch.randn(1, 3, 64, 96)
    outputs = backbone(images)
    stage_outputs = backbone.body(images)
    for (name, feature), stage, projection in zip(
        outputs.items(), ["res2", "res3", "res4", "res5"], backbone.input_proj
    ):
        expected = backbone.shared_norm(projection[0](stage_outputs[stage]))
        torch.testing.assert_close(feature, expected)
    # One norm for all levels: an affine change of it changes every level.
    with torch.no_grad():
        backbone.shared_norm.bias.add_(1.0)
    shifted = backbone(images)
    for name in outputs:
        torch.testing.assert_close(shifted[name], outputs[name] + 1.0)


def test_norm_eval_counts_and_freezing_match_the_authors_resnet50():
    """mmdetection's ResNet-50 with frozen_stages=1, norm_eval=True: 23,508,032 parameters of which
    225,344 (stem and res2) frozen; BatchNorm kept (its affine of res3-res5 trainable, 50,176)."""
    backbone = _adamixer_backbone()
    body = backbone.body
    total = sum(p.numel() for p in body.parameters())
    trainable = sum(p.numel() for p in body.parameters() if p.requires_grad)
    assert (total, trainable) == (23_508_032, 23_282_688)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    bn_trainable = sum(
        p.numel()
        for m in body.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
        if p.requires_grad
    )
    assert bn_trainable == 50_176
    for name, parameter in body.named_parameters():
        assert parameter.requires_grad == (not name.startswith(("stem.", "res2."))), name
    neck = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("body."))
    assert neck == 984_576


def test_norm_eval_keeps_batchnorm_statistics_fixed_in_training():
    backbone = _adamixer_backbone(depth=18, out_channels=64)
    backbone.train()
    assert backbone.training and backbone.input_proj.training
    batchnorms = [m for m in backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(not m.training for m in batchnorms)
    before = [m.running_mean.clone() for m in batchnorms]
    outputs = backbone(torch.randn(2, 3, 64, 64) * 3 + 1)
    sum(feature.sum() for feature in outputs.values()).backward()
    for module, mean in zip(batchnorms, before):
        torch.testing.assert_close(module.running_mean, mean)
    # The affine parameters after the frozen stages still receive gradients.
    assert backbone.body.res3[0].conv1.norm.weight.grad is not None
    assert backbone.body.stem.conv1.norm.weight.grad is None


def test_norm_eval_needs_batchnorm():
    with pytest.raises(ValueError, match="norm_eval"):
        MultiScaleResNet(depth=18, norm="FrozenBN", norm_eval=True)


def test_neck_without_norm_and_with_default_init():
    """SMCA-DETR's neck: plain convs with bias, PyTorch's default initialisation (non-zero bias),
    the extra level read from the raw last stage."""
    torch.manual_seed(0)
    backbone = MultiScaleResNet(depth=18, out_channels=32, neck_norm="", neck_init="default")
    assert all(len(projection) == 1 for projection in backbone.input_proj)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in backbone.modules())
    assert all(projection[0].bias.abs().sum() > 0 for projection in backbone.input_proj)
    assert backbone.input_proj[3][0].in_channels == 512  # raw res5 of ResNet-18
    names = {name for name, _ in backbone.named_parameters() if name.startswith("input_proj")}
    assert names == {f"input_proj.{i}.0.{kind}" for i in range(4) for kind in ("weight", "bias")}
    with pytest.raises(ValueError, match="neck_norm"):
        MultiScaleResNet(depth=18, neck_norm="BN")
    with pytest.raises(ValueError, match="neck_init"):
        MultiScaleResNet(depth=18, neck_init="kaiming")
