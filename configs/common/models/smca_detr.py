# SMCA-DETR, single scale, R50 (the authors' repository root with its README flags:
# --num_queries 300 --dynamic_scale type3). The multi-scale models in configs/smca_detr/ change what
# differs. Sizes that must agree are interpolated from one field, so one override changes all:
# model.transformer.d_model (channels everywhere), model.transformer.num_levels (decoder levels),
# model.num_classes.
from detectron2.config import LazyCall as L

from deformable_family.layers import PositionEmbeddingSine
from deformable_family.modeling.backbones import MultiScaleResNet
from deformable_family.modeling.criterion import SetCriterion
from deformable_family.modeling.matcher import HungarianMatcher
from deformable_family.modeling.smca_detr import (
    SMCADecoder,
    SMCADETR,
    SMCAEncoder,
    SMCATransformer,
)

model = L(SMCADETR)(
    backbone=L(MultiScaleResNet)(
        depth=50,
        in_features=["res5"],  # C5 only, stride 32
        num_extra_levels=0,
        out_channels="${..transformer.d_model}",
        freeze_at=2,  # stem and res2 frozen, as the authors
        norm="FrozenBN",
        stride_in_1x1=False,  # torchvision-style ResNet weights
        neck_norm="",  # DETR's input projection: a 1x1 conv with bias, no norm
        neck_init="default",  # ... with PyTorch's default initialisation
    ),
    position_embedding=L(PositionEmbeddingSine)(
        num_channels="${..transformer.d_model}",  # d_model / 2 sine features per axis
        temperature=10000,
        normalize=True,
        offset=0.0,  # DETR's normalisation: cumsum / extent, no -0.5 shift
    ),
    transformer=L(SMCATransformer)(
        encoder=L(SMCAEncoder)(
            num_layers=6,
            d_model="${..d_model}",
            d_ffn=2048,
            dropout=0.1,
            n_heads=8,
            layer_scopes=None,  # all "multi": DETR's encoder
        ),
        decoder=L(SMCADecoder)(
            num_layers=6,
            d_model="${..d_model}",
            d_ffn=2048,
            dropout=0.1,
            n_heads=8,
            num_levels="${..num_levels}",
            scale_type="independent",  # Table 2 "Indep." (the authors' type3)
            smooth=8.0,  # beta of Eq. (4) (--smooth)
            reference_stride=32.0,  # the squared distance on a stride-s map is scaled by s / 32
        ),
        d_model=256,
        num_levels=1,
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(
            cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0
        ),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        focal_alpha=0.25,
        focal_gamma=2.0,
    ),
    num_classes=80,
    num_queries=300,
    aux_loss=True,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    select_topk=100,
)
