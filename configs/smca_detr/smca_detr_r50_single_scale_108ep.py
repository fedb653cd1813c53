# SMCA-DETR, ResNet-50, single scale, 108 epochs: Table 1 (42.7 AP).
from .smca_detr_r50_single_scale_50ep import dataloader, lr_multiplier, model, optimizer, train

# 108 epochs at total batch 16. The paper does not say when the lr drops for 108 epochs: the common
# schedule keeps it at 80% of training (epoch 86.4).
train.max_iter = 798438
