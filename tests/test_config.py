"""The yacs route (deformable_family.config + detectron2's build_model) builds the same
DeformableDETR as the LazyConfigs: same modules and sizes at the defaults, same initial weights
and outputs with the same seed."""

import os

import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from deformable_family.config import add_deformable_detr_config
from deformable_family.modeling.deformable_detr import DeformableDETR

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
LAZY_CONFIGS = {
    "single_scale": "deformable_detr_r50_single_scale_50ep.py",
    "multi_scale": "deformable_detr_r50_50ep.py",
    "box_refine": "deformable_detr_r50_box_refine_50ep.py",
    "two_stage": "deformable_detr_r50_two_stage_50ep.py",
}
SMALL_LAZY = [
    "model.backbone.depth=18",
    "model.transformer.d_model=64",
    "model.transformer.encoder.num_layers=2",
    "model.transformer.decoder.num_layers=2",
    "model.transformer.encoder.d_ffn=128",
    "model.transformer.decoder.d_ffn=128",
    "model.transformer.encoder.n_heads=4",
    "model.transformer.decoder.n_heads=4",
    "model.transformer.encoder.n_points=2",
    "model.transformer.decoder.n_points=2",
    "model.num_queries=10",
]
SMALL_YACS = [
    "MODEL.RESNETS.DEPTH",
    18,
    "MODEL.MULTISCALE_RESNET.OUT_CHANNELS",
    64,
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM",
    64,
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS",
    2,
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS",
    2,
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD",
    128,
    "MODEL.DEFORMABLE_DETR.NHEADS",
    4,
    "MODEL.DEFORMABLE_DETR.ENC_N_POINTS",
    2,
    "MODEL.DEFORMABLE_DETR.DEC_N_POINTS",
    2,
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES",
    10,
]


def yacs_config(variant: str, small: bool = False):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    if variant == "single_scale":
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
        cfg.MODEL.MULTISCALE_RESNET.NUM_EXTRA_LEVELS = 0
    cfg.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE = variant in ("box_refine", "two_stage")
    cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE = variant == "two_stage"
    if small:
        cfg.merge_from_list(SMALL_YACS)
    return cfg


def lazy_model_config(variant: str, small: bool = False):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "deformable_detr", LAZY_CONFIGS[variant]))
    return LazyConfig.apply_overrides(cfg, SMALL_LAZY if small else []).model


def _same_attributes(a: DeformableDETR, b: DeformableDETR) -> None:
    for name in (
        "num_classes",
        "num_queries",
        "with_box_refine",
        "two_stage",
        "aux_loss",
        "input_format",
        "select_topk",
    ):
        assert getattr(a, name) == getattr(b, name), name
    if not a.pixel_mean.is_meta:
        assert torch.equal(a.pixel_mean, b.pixel_mean) and torch.equal(a.pixel_std, b.pixel_std)
    # Module tree, sizes, strides (stride_in_1x1), norms (FrozenBN), dropout, criterion and matcher
    # weights, position embedding settings: all in the repr.
    assert repr(a) == repr(b)
    shapes_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    assert shapes_a == {k: tuple(v.shape) for k, v in b.state_dict().items()}
    trainable_a = [name for name, p in a.named_parameters() if p.requires_grad]
    assert trainable_a == [name for name, p in b.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("variant", list(LAZY_CONFIGS))
def test_defaults_equal_the_lazy_configs(variant):
    """Full size, on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        from_yacs = META_ARCH_REGISTRY.get("DeformableDETR")(yacs_config(variant))
        from_lazy = instantiate(lazy_model_config(variant))
    assert isinstance(from_yacs, DeformableDETR)
    _same_attributes(from_yacs, from_lazy)


@pytest.mark.parametrize("variant", list(LAZY_CONFIGS))
def test_same_seed_same_weights_and_outputs(variant):
    torch.manual_seed(0)
    from_yacs = build_model(yacs_config(variant, small=True))
    torch.manual_seed(0)
    from_lazy = instantiate(lazy_model_config(variant, small=True))
    _same_attributes(from_yacs, from_lazy)
    lazy_state = from_lazy.state_dict()
    for key, value in from_yacs.state_dict().items():
        assert torch.equal(value, lazy_state[key]), key

    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 160, 192), generator=generator, dtype=torch.uint8)
    from_yacs.eval()
    from_lazy.eval()
    with torch.no_grad():
        (yacs_out,), (lazy_out,) = from_yacs([{"image": image}]), from_lazy([{"image": image}])
    for field in ("pred_boxes", "scores", "pred_classes"):
        a, b = yacs_out["instances"].get(field), lazy_out["instances"].get(field)
        a, b = (a.tensor, b.tensor) if field == "pred_boxes" else (a, b)
        assert torch.equal(a, b), field


def test_backbone_needs_the_family_config():
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DeformableDETR"
    with pytest.raises(KeyError, match="add_deformable_detr_config"):
        build_model(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_multiscale_resnet_backbone"
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(KeyError, match="add_deformable_detr_config"):
        build_model(cfg)


def test_mismatched_backbone_width_is_a_clear_error():
    cfg = yacs_config("multi_scale", small=True)
    cfg.MODEL.MULTISCALE_RESNET.OUT_CHANNELS = 32
    with pytest.raises(ValueError, match="d_model=64"):
        build_model(cfg)
