"""Exponential moving average of the weights, as a detectron2 hook (off by default)."""
import contextlib
import logging
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from detectron2.engine import HookBase
from torch import nn

__all__ = ["EMAHook", "ema_state_from_checkpoint", "load_ema_weights"]

logger = logging.getLogger(__name__)


class EMAHook(HookBase):
    """Keep ``ema = decay_t * ema + (1 - decay_t) * weights`` after every step.

    ``decay_t`` ramps linearly from 0 to ``decay`` over ``warmup_iters`` (no ramp when 0), so early
    averages do not remember the random initialisation. Floating-point parameters and buffers are
    averaged; integer buffers (e.g. BN's ``num_batches_tracked``) are copied. The average is saved
    in the trainer's checkpoint (hook state) and used for evaluation through :meth:`apply`.

    The average starts from the weights training starts from: :meth:`before_train` copies the
    model's weights as they are then, i.e. after ``train.init_checkpoint`` was loaded (the hook is
    built before ``resume_or_load``), unless a resumed checkpoint restored the average
    (:meth:`load_state_dict`), which is kept.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup_iters: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMAHook: decay must be in (0, 1), got {decay}")
        if warmup_iters < 0:
            raise ValueError(f"EMAHook: warmup_iters must be >= 0, got {warmup_iters}")
        self.model = model.module if hasattr(model, "module") else model
        self.decay = decay
        self.warmup_iters = warmup_iters
        self.reset()

    def reset(self) -> None:
        """Restart the average from the model's current weights."""
        self.num_updates = 0
        self.ema_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self._restored = False

    def before_train(self) -> None:
        if not self._restored:
            self.reset()

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
        self._restored = True


def ema_state_from_checkpoint(checkpoint: Mapping[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    """The average an :class:`EMAHook` saved in a training checkpoint, or None.

    Args:
        checkpoint: what ``DetectionCheckpointer.load`` / ``resume_or_load`` returns for a file written
            during training (the trainer's state is under "trainer", the hooks' under its "hooks").

    Returns:
        the averaged state dict of the (unwrapped) model, or None when the file holds no average.
    """
    hooks = (checkpoint.get("trainer") or {}).get("hooks") or {}
    state = hooks.get(EMAHook.__qualname__)
    return None if state is None else state["ema_state"]


def load_ema_weights(model: nn.Module, checkpoint: Mapping[str, Any], enabled: bool) -> bool:
    """When ``enabled`` (``train.ema.enabled``) and ``checkpoint`` holds an EMA, load the average
    into ``model`` (unwrapped from DDP), so that evaluation and inference use what training
    evaluated. Says in the log what is used either way.

    Args:
        model: the model the checkpoint's raw weights were just loaded into.
        checkpoint: what ``DetectionCheckpointer.load`` / ``resume_or_load`` returned for it.
        enabled: whether the config uses the EMA.

    Returns:
        True when the average was loaded.
    """
    ema_state = ema_state_from_checkpoint(checkpoint)
    if ema_state is not None and enabled:
        logger.info("Using the exponential moving average of the weights stored in the checkpoint")
        (model.module if hasattr(model, "module") else model).load_state_dict(ema_state)
        return True
    if enabled:
        logger.warning("train.ema.enabled=True but the checkpoint holds no EMA: using its raw weights")
    elif ema_state is not None:
        logger.info("The checkpoint also holds an EMA of the weights; train.ema.enabled=True would use it")
    return False
