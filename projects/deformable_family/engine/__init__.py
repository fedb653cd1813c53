from .checkpointer import AtomicDetectionCheckpointer
from .ema import EMAHook
from .launch import launch
from .param_groups import param_groups_by_name
from .setup import default_setup
from .trainer import DetrAMPTrainer, DetrSimpleTrainer, add_gradient_clipping, build_trainer

__all__ = [
    "AtomicDetectionCheckpointer",
    "DetrAMPTrainer",
    "DetrSimpleTrainer",
    "EMAHook",
    "add_gradient_clipping",
    "build_trainer",
    "default_setup",
    "launch",
    "param_groups_by_name",
]
