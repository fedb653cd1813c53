# Deformable DETR, ResNet-50, single scale: C5 only, one level (39.7 AP in the paper).
from .deformable_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.in_features = ["res5"]
model.backbone.num_extra_levels = 0
model.transformer.num_levels = 1
