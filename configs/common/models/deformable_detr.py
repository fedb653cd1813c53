# Deformable DETR, multi-scale, R50 (the authors' defaults). Variants in configs/deformable_detr/ change
# what differs. Sizes that must agree are interpolated from one field, so one override changes all:
# model.transformer.d_model (channels everywhere), model.transformer.num_levels, model.num_classes,
# model.num_queries, model.two_stage.
from detectron2.config import LazyCall as L

from deformable_family.layers import PositionEmbeddingSine
from deformable_family.modeling.backbones import MultiScaleResNet
from deformable_family.modeling.criterion import SetCriterion
from deformable_family.modeling.deformable_detr import (
    DeformableDecoder,
    DeformableDETR,
    DeformableEncoder,
    DeformableTransformer,
)
from deformable_family.modeling.matcher import HungarianMatcher

model = L(DeformableDETR)(
    backbone=L(MultiScaleResNet)(
        depth=50,
        in_features=["res3", "res4", "res5"],
        num_extra_levels=1,  # C6 from C5: 4 levels at strides 8, 16, 32, 64
        out_channels="${..transformer.d_model}",
        freeze_at=2,  # stem and res2 frozen, as the authors
        norm="FrozenBN",
        stride_in_1x1=False,  # torchvision-style ResNet weights
    ),
    position_embedding=L(PositionEmbeddingSine)(
        num_channels="${..transformer.d_model}",  # d_model / 2 sine features per axis
        temperature=10000,
        normalize=True,
    ),
    transformer=L(DeformableTransformer)(
        encoder=L(DeformableEncoder)(
            num_layers=6,
            d_model="${..d_model}",
            d_ffn=1024,
            dropout=0.1,
            n_levels="${..num_levels}",
            n_heads=8,
            n_points=4,
            # "extension" (the compiled CPU/CUDA kernels) or "triton" (the Triton kernels, CUDA).
            attn_backend="extension",
        ),
        decoder=L(DeformableDecoder)(
            num_layers=6,
            d_model="${..d_model}",
            d_ffn=1024,
            dropout=0.1,
            n_levels="${..num_levels}",
            n_heads=8,
            n_points=4,
            attn_backend="extension",  # "extension" or "triton", as the encoder
        ),
        d_model=256,
        num_levels=4,
        two_stage="${..two_stage}",
        two_stage_num_proposals="${..num_queries}",
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
    with_box_refine=False,
    two_stage=False,
    # Two-stage only. As the authors, the proposal class head is as wide as the detection heads and only
    # its first logit (trained as "foreground") ranks proposals; 1 gives a binary head that behaves the
    # same with (num_classes - 1) * (d_model + 1) fewer parameters.
    proposal_num_classes="${.num_classes}",
    aux_loss=True,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    select_topk=100,
)
