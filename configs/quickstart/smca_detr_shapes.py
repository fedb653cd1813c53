# CPU quickstart: a small SMCA-DETR trained from scratch on the synthetic shapes dataset, then
# evaluated with COCOEvaluator. No weights are downloaded.
#   python train_net.py --config-file configs/quickstart/smca_detr_shapes.py
# Measured wall time, curve and AP: benchmarks/results/quickstart_smca.md.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from ..common.data.shapes_detr import dataloader
from ..common.models.cpu_small import shrink_for_cpu
from ..common.models.smca_detr import model
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

# Flip and multi-scale resize only, as the Deformable DETR quickstart: the recipe's random-crop
# branch (configs/common/data/shapes_detr.py) mostly hides objects in a few epochs.
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeShortestEdge)(
        short_edge_length=[80, 88, 96, 104, 112, 120, 128], max_size=213, sample_style="choice"
    ),
]
dataloader.train.total_batch_size = 4

# The quickstarts' small model (configs/common/models/cpu_small.py): ResNet-18 from scratch, three
# levels at strides 8, 16, 32 (the third from the neck's stride-2 conv on res4), d_model 128, 1
# encoder layer (self-attention over all three maps jointly: the paper's "multi-scale
# self-attention") and 3 decoder layers, FFN 256, no dropout. The decoder is the paper's multi-scale
# SMCA decoder: a Gaussian-modulated co-attention per map and scale selection over the three.
shrink_for_cpu(model)
# A sharper Gaussian prior than the COCO recipe's (beta = 8 on a stride-32 map): on 100-200 px
# images the maps have only 4-26 cells per side, where beta = 8 gives a prior of -0.5 two cells
# away, hardly a prior at all. beta = 1 with distances in cells of a stride-16 map (so the stride-8
# map's squared distances count 1/2, the stride-32 map's 2) makes it -4 there.
model.transformer.decoder.smooth = 1.0
model.transformer.decoder.reference_stride = 16.0
model.num_classes = 5
# At most 4 objects per image, but 100 queries: the query centres are learned constants (the same
# for every image), so more queries cover the image more densely (AP50 4.2 vs 3.3 with 30 after
# 500 iterations; benchmarks/results/quickstart_smca.md).
model.num_queries = 100

train.device = "cpu"
train.output_dir = "./output/quickstart_smca_shapes"
train.max_iter = 3000
train.eval_period = 500
train.log_period = 20
train.checkpointer.period = 500
train.checkpointer.max_to_keep = 2
train.seed = 0

# The COCO recipe's lr 1e-4 doubled; 5e-4 (the Deformable DETR quickstart's) trains worse here.
optimizer.lr = 2e-4
# The backbone is trained from scratch: no 0.1x for it (the authors' 0.1x is for ImageNet weights).
optimizer.params.lr_multipliers = {}

# Linear warm-up over the first 5% of training; the step to 0.1x at 80% is kept.
lr_multiplier.warmup_length = 0.05
lr_multiplier.warmup_factor = 0.01
