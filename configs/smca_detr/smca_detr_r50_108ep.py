# SMCA-DETR, ResNet-50, the paper's multi-scale model, 108 epochs (Table 1/4: 45.6 AP).
from .smca_detr_r50_50ep import dataloader, lr_multiplier, model, optimizer, train

# 108 epochs at total batch 8; the lr drop stays at 80% of training (the paper does not say).
train.max_iter = 1596875
