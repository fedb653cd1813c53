# StageInteractor, ResNet-50, 100 queries, 12 epochs, single-scale training (the authors'
# stageinteractor_r50_1x_coco.py: 44.8 AP val in the paper). Same recipe as AdaMixer's 1x.
from ..adamixer.adamixer_r50_1x import dataloader, lr_multiplier, optimizer, train
from ..common.models.stageinteractor import model
