"""detectron2 trainers with the two checks the DETR recipe needs: gradient max-norm clipping over
all parameters, and a clear error when the loss stops being finite."""
import logging
from typing import Iterable, Mapping, Optional

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch import nn

__all__ = ["build_trainer", "add_gradient_clipping", "DetrSimpleTrainer", "DetrAMPTrainer"]

logger = logging.getLogger(__name__)


def add_gradient_clipping(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first clip the gradient norm of all its parameters, taken together
    (``torch.nn.utils.clip_grad_norm_``), as the authors do (max-norm 0.1, L2).

    Clipping inside ``step`` works with both trainers: ``SimpleTrainer`` calls ``step`` after
    ``backward``; ``AMPTrainer`` calls ``GradScaler.step``, which unscales the gradients before
    calling ``step`` and skips it when they are not finite, so the norm is taken on true gradients.
    The optimizer's class is replaced by a subclass of it (as detectron2's
    ``maybe_add_gradient_clipping`` does), so its ``state_dict`` is unchanged.
    """
    if max_norm <= 0:
        raise ValueError(f"add_gradient_clipping: max_norm must be > 0, got {max_norm}")
    if getattr(optimizer, "_clip_grad_max_norm", None) is not None:
        raise ValueError("add_gradient_clipping: the optimizer already clips gradients")
    base = type(optimizer)

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        total_norm = torch.nn.utils.clip_grad_norm_(params, self._clip_grad_max_norm, self._clip_grad_norm_type)
        self.last_grad_norm = total_norm.detach()
        return base.step(self, closure)

    optimizer.__class__ = type(base.__name__ + "WithGradClip", (base,), {"step": step})
    optimizer._clip_grad_max_norm = float(max_norm)
    optimizer._clip_grad_norm_type = float(norm_type)
    return optimizer


class _FiniteLossCheck:
    """Raise ``FloatingPointError`` naming the iteration as soon as a loss is not finite.

    ``_write_metrics`` is the one method both detectron2 v0.6 and main call after the forward and
    before ``optimizer.step()``, on every rank; checking here stops training before a NaN reaches
    the weights (detectron2's own check runs only on rank 0, and in main may run asynchronously).
    """

    def _write_metrics(self, loss_dict: Mapping[str, torch.Tensor], data_time: float, *args, **kwargs):
        bad = [k for k, v in loss_dict.items() if not torch.isfinite(v.detach()).all()]
        if bad:
            values = {k: float(v.detach().float().mean()) for k, v in loss_dict.items()}
            raise FloatingPointError(f"Loss became infinite or NaN at iteration {self.iter}: {bad} (losses: {values})")
        return super()._write_metrics(loss_dict, data_time, *args, **kwargs)


class DetrSimpleTrainer(_FiniteLossCheck, SimpleTrainer):
    """detectron2's SimpleTrainer with the finite-loss check."""


class DetrAMPTrainer(_FiniteLossCheck, AMPTrainer):
    """detectron2's AMPTrainer with the finite-loss check."""


def build_trainer(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    amp: bool = False,
    clip_grad_max_norm: Optional[float] = None,
    clip_grad_norm_type: float = 2.0,
) -> SimpleTrainer:
    """An AMP trainer (CUDA only) or a plain one, with optional gradient clipping.

    Only arguments that detectron2 v0.6 and main share are passed to the trainers.
    """
    if clip_grad_max_norm is not None:
        add_gradient_clipping(optimizer, clip_grad_max_norm, clip_grad_norm_type)
    if amp:
        if not torch.cuda.is_available():
            raise ValueError("train.amp.enabled=True needs CUDA; set train.amp.enabled=False to train on the CPU")
        return DetrAMPTrainer(model, data_loader, optimizer)
    return DetrSimpleTrainer(model, data_loader, optimizer)
