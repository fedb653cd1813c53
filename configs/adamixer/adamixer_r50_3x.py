# AdaMixer, ResNet-50, 300 queries, 36 epochs with multi-scale training and random crops (the authors'
# adamixer_r50_300_query_crop_mstrain_480-800_3x_coco.py: 47.0 AP val, 47.2 test-dev).
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from deformable_family.data import detr_train_augmentations

from .adamixer_r50_1x import dataloader, lr_multiplier, model, optimizer, train

model.num_queries = 300
# Flip, then with probability 1/2 a multi-scale resize (480-800), else resize to 400/500/600, crop
# 384-600 px (each side drawn independently), multi-scale resize (DETR's recipe, the authors' order).
dataloader.train.mapper.augmentations = L(detr_train_augmentations)(
    multi_scale_sizes=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
    max_size=1333,
    crop_pre_resize_sizes=[400, 500, 600],
    crop_size=[384, 600],
    crop_pre_resize_max_size=1333,
)

# 36 epochs of 7,330 iterations; x0.1 after epochs 24 and 33; the same 500-iteration warm-up.
train.max_iter = 263880
lr_multiplier.scheduler.milestones = [24, 33]
lr_multiplier.scheduler.num_updates = 36
lr_multiplier.warmup_length = 500 / 263880
