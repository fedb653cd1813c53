# AdaMixer, ResNet-50, 100 queries, 12 epochs on COCO, single-scale training (the authors'
# adamixer_r50_1x_coco.py: 42.7 AP in the paper, 42.6 reproduced by the authors).
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..common.data.coco_adamixer import dataloader
from ..common.models.adamixer import model
from ..common.optim import optimizer
from ..common.train import train

# 12 epochs of the 117,266 train2017 images with annotations at batch 16: 7,330 iterations per
# epoch. Change max_iter with the batch size; the steps and the warm-up are fractions of it.
train.max_iter = 87960
train.clip_grad.max_norm = 1.0  # L2 norm of all gradients, as the authors
train.ddp.find_unused_parameters = False  # every parameter is used (no dead parameters here)
train.checkpointer.period = 7330
train.eval_period = 7330

# AdamW, lr 2.5e-5 and weight decay 1e-4 on every parameter (norms, biases, embeddings included),
# no lr multiplier for the backbone.
optimizer.lr = 2.5e-5
optimizer.weight_decay = 1e-4
optimizer.params.lr_multipliers = {}

# x0.1 after epochs 8 and 11 of 12; linear warm-up over the first 500 iterations from 0.001 x lr.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[8, 11], num_updates=12),
    warmup_length=500 / 87960,
    warmup_factor=0.001,
)

# No pretrained weights are fetched: supply ImageNet ResNet-50 weights in detectron2's names (e.g.
# torchvision's converted by detectron2's tools/convert-torchvision-to-d2.py), or a checkpoint
# converted by tools/convert_official_adamixer.py.
train.init_checkpoint = ""
