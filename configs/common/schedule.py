from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

# lr x 0.1 after 80% of training (epoch 40 of 50 in the authors' recipe). fvcore schedulers are
# functions of the fraction of training, so the drop follows any train.max_iter override.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[40], num_updates=50),
    warmup_length=0.0,  # the authors do not warm up
    warmup_factor=1.0,
)
