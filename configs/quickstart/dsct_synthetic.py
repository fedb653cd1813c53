# CPU quickstart of DSCT: a small DSCT trained from scratch on the synthetic emotion dataset
# (deformable_family.data.synthetic_emotions: EMOTIC's json format, 26 emotions following the person's
# own head, the scene and objects, or the other persons), then evaluated with EmoticEvaluator on its
# val split (mAP and the chance level of that split). No weights are downloaded.
#   python train_net.py --config-file configs/quickstart/dsct_synthetic.py
# Without SSRA: add model.transformer.decoder.post_cross_attn.num_spatial=0.
# Measured wall time, curve and mAP with and without SSRA: benchmarks/results/dsct_quickstart.md.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from deformable_family.data import load_dataset_dicts

from ..common.data.emotic_detr import dataloader
from ..common.models.cpu_small import shrink_for_cpu
from ..common.models.dsct import model
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

# 136-168 x 112-136 px images: flip and a multi-scale resize around their size (the recipe's crop
# branch hides the context the labels depend on in a short schedule); test at short side 128.
dataloader.train.dataset = L(load_dataset_dicts)(names="emotic_synthetic_train", filter_empty=False)
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeShortestEdge)(
        short_edge_length=[96, 104, 112, 120, 128, 136], max_size=213, sample_style="choice"
    ),
]
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset = L(load_dataset_dicts)(names="emotic_synthetic_val", filter_empty=False)
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=128, max_size=213)
]
dataloader.test.num_workers = 1

# As the shapes quickstart (configs/common/models/cpu_small.py): ResNet-18 from scratch, three
# levels, d_model 128, 1 + 3 layers, no dropout.
shrink_for_cpu(model)
# 30 context queries (1/10 of 300) and SSRA's neighbours scaled alike (100 -> 10, 50 -> 5); 4 subject
# queries for at most 4 persons, as EMOTIC.
model.num_context_queries = 30
model.num_subject_queries = 4
model.transformer.decoder.post_cross_attn.num_spatial = 10
model.transformer.decoder.post_cross_attn.num_semantic = 5

train.device = "cpu"
train.output_dir = "./output/quickstart_dsct"
train.max_iter = 2000
train.eval_period = 500
train.log_period = 20
train.checkpointer.period = 500
train.checkpointer.max_to_keep = 2
train.seed = 0

optimizer.lr = 5e-4
# Trained from scratch: no 0.1x for the backbone.
optimizer.params.lr_multipliers = {"sampling_offsets": 0.1, "reference_points": 0.1}
lr_multiplier.warmup_length = 0.05
lr_multiplier.warmup_factor = 0.01
