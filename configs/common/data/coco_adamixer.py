# COCO for AdaMixer / StageInteractor (mmdetection recipe of the authors): training drops the images
# without annotations (mmdetection's filter_empty_gt), resizes to shortest edge 800 (longest at most
# 1333) and flips; batch 16 (8 GPUs x 2). Test as coco_detr.py: 800 / 1333. The 3x configs replace
# the training augmentations. Inputs are padded to a multiple of 32 by the model.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from .coco_detr import dataloader

dataloader.train.dataset.filter_empty = True
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16
