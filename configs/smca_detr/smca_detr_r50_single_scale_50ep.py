# SMCA-DETR, ResNet-50, single scale (C5), 50 epochs on COCO: Table 1/2 "SMCA" (41.0 AP in the paper
# and the authors' README).
from ..common.data.coco_detr import dataloader
from ..common.models.smca_detr import model
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

# The authors' recipe (DETR's): AdamW lr 1e-4, the ResNet at 1e-5, weight decay 1e-4, grad-norm clip
# 0.1 (configs/common/train.py), lr x 0.1 at epoch 40 of 50 (configs/common/schedule.py: at 80% of
# train.max_iter). Their README trains 2 images x 8 GPUs = total batch 16; 50 epochs of the 118,287
# train2017 images (images without annotations kept, as DETR) = 369,647 iterations.
dataloader.train.total_batch_size = 16
train.max_iter = 369647
optimizer.lr = 1e-4
optimizer.params.lr_multipliers = {"backbone.body.": 0.1}

# No pretrained weights are fetched: supply ImageNet ResNet weights in detectron2's names, or a
# checkpoint converted by tools/convert_official_smca.py.
train.init_checkpoint = ""
