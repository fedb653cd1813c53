# SMCA-DETR, ResNet-101, the paper's multi-scale model, 50 epochs (Table 4: 44.4 AP).
from .smca_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
