# Deformable DETR, ResNet-50, multi-scale + iterative bounding-box refinement (46.2 AP in the paper).
from .deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.with_box_refine = True
