# CPU quickstart: a small AdaMixer trained from scratch on the synthetic shapes dataset, then evaluated
# with COCOEvaluator. No weights are downloaded.
#   python train_net.py --config-file configs/quickstart/adamixer_shapes.py
# Measured wall time and AP: benchmarks/results/quickstart_adamixer.md.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from ..common.data.shapes_detr import dataloader
from ..common.models.adamixer import model
from ..common.models.cpu_small import shrink_adamixer_for_cpu
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

# Flip and multi-scale resize only, as the Deformable DETR quickstart (the crop branch hides objects
# in a few epochs).
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeShortestEdge)(short_edge_length=[80, 88, 96, 104, 112, 120, 128], max_size=213, sample_style="choice"),
]
dataloader.train.total_batch_size = 4

# The quickstarts' small model (configs/common/models/cpu_small.py): ResNet-18 from scratch on
# C2-C4, 3 stages, d_model 128.
shrink_adamixer_for_cpu(model)
model.stages.num_points = 16  # a 4 x 4 grid at initialisation (the authors' init for square numbers)
model.stages.out_points = 32
model.num_classes = 5
model.num_queries = 30  # at most 4 objects per image

train.device = "cpu"
train.output_dir = "./output/quickstart_adamixer_shapes"
train.max_iter = 1500
train.eval_period = 500
train.log_period = 20
train.checkpointer.period = 500
train.checkpointer.max_to_keep = 2
train.seed = 0
train.clip_grad.max_norm = 1.0  # the authors' clipping

# AdamW on every parameter at one lr (no 0.1x groups: AdaMixer has none, and the backbone starts
# from scratch), weight decay 1e-4 as the authors.
optimizer.lr = 2e-4
optimizer.params.lr_multipliers = {}
# Linear warm-up over the first 5% of training, x0.1 at 80%.
lr_multiplier.warmup_length = 0.05
lr_multiplier.warmup_factor = 0.01
