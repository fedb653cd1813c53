# CPU quickstart: a small StageInteractor trained from scratch on the synthetic shapes dataset, then
# evaluated with COCOEvaluator. No weights are downloaded.
#   python train_net.py --config-file configs/quickstart/stageinteractor_shapes.py
# Measured wall time and AP: benchmarks/results/quickstart_adamixer.md.
from ..common.models.cpu_small import shrink_adamixer_for_cpu
from ..common.models.stageinteractor import model
from .adamixer_shapes import dataloader, lr_multiplier, optimizer, train

# The small model of the AdaMixer quickstart (configs/common/models/cpu_small.py).
shrink_adamixer_for_cpu(model)
model.stages.num_points = 16  # 4 coarse x 4 fine at stages 1-2
model.stages.first_stage_num_points = 32  # 8 coarse x 4 fine at stage 0
model.stages.fine_points = 4
model.stages.out_points = 32
model.stages.reuse_start_stage = 2  # stage 2 reuses stage 1's filters
model.num_classes = 5
model.num_queries = 30

train.output_dir = "./output/quickstart_stageinteractor_shapes"
