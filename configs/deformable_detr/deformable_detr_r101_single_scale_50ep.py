# ResNet-101 counterpart of deformable_detr_r50_single_scale_50ep.py (not among the authors' released models).
from .deformable_detr_r50_single_scale_50ep import (
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.depth = 101
