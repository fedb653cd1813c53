# AdaMixer, ResNet-101, 300 queries, 36 epochs with crops (the authors'
# adamixer_r101_300_query_crop_mstrain_480-800_3x_coco.py: 48.0 AP val, 48.1 test-dev).
from .adamixer_r50_3x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
