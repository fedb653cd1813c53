"""detectron2 trainers with the two checks the DETR recipe needs: gradient max-norm clipping over
all parameters (its norm logged as ``grad_norm``), and a clear error on every rank when a loss
stops being finite."""
import logging
from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm
from torch import nn

__all__ = [
    "build_trainer",
    "add_gradient_clipping",
    "DetrSimpleTrainer",
    "DetrAMPTrainer",
    "DetrCPUAutocastTrainer",
    "NonFiniteLossCheck",
]

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


class NonFiniteLossCheck(HookBase):
    """Stop training on every rank, naming the iteration, as soon as a loss is not finite on any
    rank; put the gradient norm computed by :func:`add_gradient_clipping` in the event storage
    (``grad_norm``, before clipping).

    The check sees the loss dict of every step through a forward hook on the trainer's model (in
    training mode the model returns the loss dict; detectron2's trainer says to wrap the model to
    act on the losses). It does not rely on the trainer's metric writing, which detectron2 main may
    run asynchronously and which checks only on rank 0. All losses are checked in one reduction and
    the flags of all ranks are summed in one all_reduce, a single host sync per step; the check
    runs after the forward, before ``backward`` and ``optimizer.step``, so a NaN never reaches the
    weights, and every rank raises at the same iteration instead of leaving the others waiting in
    a collective.
    """

    def __init__(self):
        self._handle = None

    def before_train(self) -> None:
        self._handle = self.trainer.model.register_forward_hook(self._check_losses)

    def after_train(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check_losses(self, module: nn.Module, inputs, outputs) -> None:
        if not module.training or not isinstance(outputs, Mapping) or not outputs:
            return
        losses = torch.stack([value.detach().float().sum() for value in outputs.values()])
        world_size = comm.get_world_size()
        rank_flags = torch.zeros(world_size, dtype=torch.float32, device=losses.device)
        rank_flags[comm.get_rank()] = (~torch.isfinite(losses)).any().float()
        if world_size > 1:
            dist.all_reduce(rank_flags)
        if bool(rank_flags.any()):  # the one host sync of the check
            bad_ranks = torch.nonzero(rank_flags).flatten().tolist()
            values = {key: float(value.detach().float().mean()) for key, value in outputs.items()}
            raise FloatingPointError(
                f"Loss became infinite or NaN at iteration {self.trainer.iter} on rank(s) {bad_ranks} "
                f"(this is rank {comm.get_rank()}; its losses: {values})"
            )

    def after_step(self) -> None:
        norm = getattr(self.trainer.optimizer, "last_grad_norm", None)
        if norm is not None and comm.is_main_process():
            self.trainer.storage.put_scalar("grad_norm", float(norm))
        if norm is not None:
            # AMP skips optimizer.step on inf gradients: never log a stale norm.
            self.trainer.optimizer.last_grad_norm = None


class DetrSimpleTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer with :class:`NonFiniteLossCheck` registered first."""

    def __init__(self, model, data_loader, optimizer, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.register_hooks([NonFiniteLossCheck()])


class DetrAMPTrainer(AMPTrainer):
    """detectron2's AMPTrainer with :class:`NonFiniteLossCheck` registered first."""

    def __init__(self, model, data_loader, optimizer, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.register_hooks([NonFiniteLossCheck()])


class DetrCPUAutocastTrainer(DetrSimpleTrainer):
    """:class:`DetrSimpleTrainer` whose steps run under ``torch.autocast("cpu", dtype)``: matrix
    multiplies and convolutions in bfloat16 (on CPUs with AVX-512 BF16 or AMX, faster than float32),
    weights, gradients and optimizer state in float32. bfloat16 has float32's exponent range, so no
    loss scaling is needed (unlike CUDA's float16 AMP). The whole step runs inside the context, so
    the same code serves detectron2 v0.6 and main, whose ``run_step`` differ."""

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.autocast_dtype = dtype

    def run_step(self):
        with torch.autocast("cpu", dtype=self.autocast_dtype):
            super().run_step()


def build_trainer(
    model: nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    amp: bool = False,
    clip_grad_max_norm: Optional[float] = None,
    clip_grad_norm_type: float = 2.0,
    device: str = "cuda",
    amp_dtype: str = "bfloat16",
) -> SimpleTrainer:
    """An AMP trainer, or a plain one, with optional gradient clipping.

    With ``amp`` on CUDA: detectron2's AMPTrainer (float16 with a GradScaler; ``amp_dtype`` is not
    used). With ``amp`` and ``device="cpu"``: :class:`DetrCPUAutocastTrainer` with
    ``amp_dtype`` ("bfloat16", the only type CPU autocast supports for training).
    Only arguments that detectron2 v0.6 and main share are passed to the trainers.
    """
    if clip_grad_max_norm is not None:
        add_gradient_clipping(optimizer, clip_grad_max_norm, clip_grad_norm_type)
    if amp and device == "cpu":
        if amp_dtype != "bfloat16":
            raise ValueError(
                f"train.amp.dtype={amp_dtype!r}: on the CPU only 'bfloat16' is supported "
                "(float16 autocast has no fast CPU kernels and would need loss scaling)"
            )
        return DetrCPUAutocastTrainer(model, data_loader, optimizer, dtype=torch.bfloat16)
    if amp:
        if not torch.cuda.is_available():
            raise ValueError(
                "train.amp.enabled=True with train.device='cuda' needs CUDA; on the CPU set "
                "train.device='cpu' (bfloat16 autocast) or train.amp.enabled=False"
            )
        return DetrAMPTrainer(model, data_loader, optimizer)
    return DetrSimpleTrainer(model, data_loader, optimizer)
