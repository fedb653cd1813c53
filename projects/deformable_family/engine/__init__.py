from .checkpointer import AtomicDetectionCheckpointer
from .ema import EMAHook, ema_state_from_checkpoint, load_ema_weights
from .launch import launch
from .param_groups import param_groups_by_name
from .setup import default_setup
from .trainer import (
    DetrAMPTrainer,
    DetrCPUAutocastTrainer,
    DetrSimpleTrainer,
    NonFiniteLossCheck,
    add_gradient_clipping,
    build_trainer,
)

__all__ = [
    "AtomicDetectionCheckpointer",
    "DetrAMPTrainer",
    "DetrCPUAutocastTrainer",
    "DetrSimpleTrainer",
    "EMAHook",
    "NonFiniteLossCheck",
    "add_gradient_clipping",
    "build_trainer",
    "default_setup",
    "ema_state_from_checkpoint",
    "launch",
    "load_ema_weights",
    "param_groups_by_name",
]
