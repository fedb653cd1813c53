# StageInteractor, ResNet-50, 300 queries, 36 epochs with crops (the authors'
# stageinteractor_r50_300_query_crop_mstrain_480-800_3x_coco.py: 49.0 AP test-dev).
from ..adamixer.adamixer_r50_3x import dataloader, lr_multiplier, optimizer, train
from ..common.models.stageinteractor import model

model.num_queries = 300
