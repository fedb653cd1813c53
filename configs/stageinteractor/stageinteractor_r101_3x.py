# StageInteractor, ResNet-101, 300 queries, 36 epochs with crops (the authors'
# stageinteractor_r101_300_query_crop_mstrain_480-800_3x_coco.py: 50.4 AP test-dev).
from .stageinteractor_r50_3x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.depth = 101
