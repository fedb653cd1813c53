# Deformable DETR, ResNet-50, multi-scale (4 levels), 50 epochs on COCO: the authors' main model
# (43.8 AP in the paper, 44.5 in their README).
from ..common.data.coco_detr import dataloader
from ..common.models.deformable_detr import model
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

# The authors' recipe, from the common pieces: total batch 32 (dataloader.train.total_batch_size) and
# train.max_iter = 184,824 = 50 epochs of the 118,287 train2017 images (images without annotations are
# kept, as the authors do). Change max_iter with the batch size; the lr drop follows at 80% (epoch 40).

# No pretrained weights are fetched: supply ImageNet ResNet weights in detectron2's names (e.g.
# torchvision's converted by detectron2's tools/convert-torchvision-to-d2.py), or a checkpoint
# converted by tools/convert_official_deformable_detr.py.
train.init_checkpoint = ""
