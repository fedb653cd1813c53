# CPU quickstart: a small Deformable DETR (two-stage, with box refinement) trained from scratch on
# the synthetic shapes dataset, then evaluated with COCOEvaluator. No weights are downloaded.
#   python train_net.py --config-file configs/quickstart/deformable_detr_shapes.py
# Measured wall time and AP: benchmarks/results/quickstart.md.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from ..common.data.shapes_detr import dataloader
from ..common.models.cpu_small import shrink_for_cpu
from ..common.models.deformable_detr import model
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

# Flip and multi-scale resize only: the recipe's random-crop branch (configs/common/data/shapes_detr.py)
# helps long schedules; in a few epochs it mostly hides objects the model has not yet learned.
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeShortestEdge)(short_edge_length=[80, 88, 96, 104, 112, 120, 128], max_size=213, sample_style="choice"),
]
dataloader.train.total_batch_size = 4

# The quickstarts' small model (configs/common/models/cpu_small.py): ResNet-18 from scratch, three
# levels, d_model 128, 1 + 3 layers, no dropout.
shrink_for_cpu(model)
model.num_classes = 5
model.num_queries = 30  # at most 4 objects per image
model.with_box_refine = True
model.two_stage = True

train.device = "cpu"
train.output_dir = "./output/quickstart_shapes"
train.max_iter = 2000
train.eval_period = 500
train.log_period = 20
train.checkpointer.period = 500
train.checkpointer.max_to_keep = 2
train.seed = 0

optimizer.lr = 5e-4
# The backbone is trained from scratch: no 0.1x for it (the authors' 0.1x is for ImageNet weights).
optimizer.params.lr_multipliers = {"sampling_offsets": 0.1, "reference_points": 0.1}

# Linear warm-up over the first 5% of training; the step to 0.1x at 80% is kept.
lr_multiplier.warmup_length = 0.05
lr_multiplier.warmup_factor = 0.01
