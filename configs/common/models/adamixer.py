# AdaMixer R50, 100 queries (the authors' adamixer_r50_1x_coco.py). Variants in configs/adamixer/ change
# what differs. Sizes that must agree are interpolated from one field: model.num_classes,
# model.stages.d_model (backbone channels follow), model.stages.num_groups.
from detectron2.config import LazyCall as L

from deformable_family.modeling.adamixer import AdaMixer, adamixer_stages
from deformable_family.modeling.backbones import MultiScaleResNet
from deformable_family.modeling.criterion import SetCriterion
from deformable_family.modeling.matcher import HungarianMatcher

model = L(AdaMixer)(
    backbone=L(MultiScaleResNet)(
        depth=50,
        in_features=["res2", "res3", "res4", "res5"],  # C2-C5, strides 4-32
        num_extra_levels=0,
        out_channels="${..stages.d_model}",
        freeze_at=2,  # stem and res2 frozen (mmdetection's frozen_stages=1)
        norm="BN",
        norm_eval=True,  # BatchNorm in eval mode, affine of res3-res5 trained (mmdetection's norm_eval)
        stride_in_1x1=False,  # pytorch style: stride on the 3x3 conv
        shared_norm=True,  # 1x1 conv with bias per level, then one GroupNorm(32) for all levels
    ),
    stages=L(adamixer_stages)(
        num_stages=6,
        d_model=256,
        num_heads=8,
        ffn_dim=2048,
        num_classes="${..num_classes}",
        num_groups=4,
        num_points=32,  # P_in
        out_points=128,  # P_out
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        # mmdetection's HungarianAssigner: focal cost 2, L1 5 on normalised xyxy, GIoU 2.
        matcher=L(HungarianMatcher)(
            cost_class=2.0,
            cost_bbox=5.0,
            cost_giou=2.0,
            focal_alpha=0.25,
            focal_gamma=2.0,
            l1_box_format="xyxy",
        ),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        focal_alpha=0.25,
        focal_gamma=2.0,
        l1_box_format="xyxy",
    ),
    num_classes=80,
    num_queries=100,
    aux_loss=True,  # every stage supervised with weight 1
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
    select_topk="${.num_queries}",  # max_per_img = number of queries
    size_divisibility=32,
)
