# Deformable DETR, ResNet-50, multi-scale (4 levels), 50 epochs on COCO: the authors' main model
# (43.8 AP in the paper, 44.5 in their README).
from ..common.data.coco_detr import dataloader
from ..common.models.deformable_detr import model
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

# The authors' total batch is 32. detectron2's coco_2017_train drops images without annotations,
# leaving 117,266 images: 117,266 / 32 = 3,664.6 iterations per epoch, x 50 epochs = 183,229
# (rounded up). Change max_iter with the batch size; the lr drop is a fraction of max_iter (epoch 40).
dataloader.train.total_batch_size = 32
train.max_iter = 183229

# No pretrained weights are fetched: supply ImageNet ResNet weights in detectron2's names (e.g.
# torchvision's converted by detectron2's tools/convert-torchvision-to-d2.py), or a checkpoint
# converted by tools/convert_official_deformable_detr.py.
train.init_checkpoint = ""
