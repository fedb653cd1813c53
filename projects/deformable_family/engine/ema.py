"""Exponential moving average of the weights, as a detectron2 hook (off by default)."""
import contextlib
from typing import Dict, Iterator

import torch
from detectron2.engine import HookBase
from torch import nn

__all__ = ["EMAHook"]


class EMAHook(HookBase):
    """Keep ``ema = decay_t * ema + (1 - decay_t) * weights`` after every step.

    ``decay_t`` ramps linearly from 0 to ``decay`` over ``warmup_iters`` (no ramp when 0), so early
    averages do not remember the random initialisation. Floating-point parameters and buffers are
    averaged; integer buffers (e.g. BN's ``num_batches_tracked``) are copied. The average is saved
    in the trainer's checkpoint (hook state) and used for evaluation through :meth:`apply`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup_iters: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMAHook: decay must be in (0, 1), got {decay}")
        if warmup_iters < 0:
            raise ValueError(f"EMAHook: warmup_iters must be >= 0, got {warmup_iters}")
        self.model = model.module if hasattr(model, "module") else model
        self.decay = decay
        self.warmup_iters = warmup_iters
        self.num_updates = 0
        self.ema_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _decay(self) -> float:
        if self.warmup_iters == 0:
            return self.decay
        return self.decay * min(1.0, self.num_updates / self.warmup_iters)

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = self._decay()
        for name, value in self.model.state_dict().items():
            ema = self.ema_state[name]
            if ema.is_floating_point():
                ema.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                ema.copy_(value)

    def after_step(self) -> None:
        self.update()

    @contextlib.contextmanager
    def apply(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the model (e.g. to evaluate them)."""
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema_state)
        try:
            yield
        finally:
            self.model.load_state_dict(backup)

    def state_dict(self) -> Dict[str, object]:
        return {"ema_state": self.ema_state, "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: Dict[str, object]) -> None:
        for name, value in state_dict["ema_state"].items():
            self.ema_state[name].copy_(value)
        self.num_updates = int(state_dict["num_updates"])
