# StageInteractor R50, 100 queries (the authors' stageinteractor_r50_1x_coco.py): the AdaMixer
# meta-architecture with StageInteractor's stages (coarse-and-fine sampler, cascade dynamic mixing)
# and cross-stage label assignment in the criterion. Variants in configs/stageinteractor/.
from detectron2.config import LazyCall as L

from deformable_family.modeling.adamixer import stageinteractor_stages

from .adamixer import model

model.stages = L(stageinteractor_stages)(
    num_stages=6,
    d_model=256,
    num_heads=8,
    ffn_dim=2048,
    num_classes="${..num_classes}",
    num_groups=4,
    num_points=32,  # points per group at stages 1-5: 4 coarse x 8 fine
    first_stage_num_points=64,  # stage 0: 8 coarse x 8 fine
    fine_points=8,
    out_points=128,
    reuse_start_stage=2,  # stage s >= 2 reuses the filters of stages 1..s-1
)
# Multi-hot targets from the matches of stages i-1, i, i+1, ..., 5 where the box of stage i has
# IoU >= 0.5 with the target; the focal loss on binary targets is the authors' quality focal loss.
model.criterion.cross_stage_iou_threshold = 0.5
