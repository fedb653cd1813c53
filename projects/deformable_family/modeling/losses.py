"""Losses of the set-prediction detectors of the family, each divided by ``num_boxes``.

``num_boxes`` is the number of target boxes in the batch averaged over the workers (see
``deformable_family.modeling.criterion.compute_num_boxes``); dividing by it rather than by the
local count keeps the gradient of every box equal whatever the split of boxes across workers.
It may be a Python number or a 0-dim tensor.
"""
from typing import Union

import torch.nn.functional as F
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou

__all__ = ["sigmoid_focal_loss", "l1_box_loss", "giou_box_loss"]

NumBoxes = Union[float, int, Tensor]


def _check_same_shape(source: Tensor, target: Tensor, source_name: str, target_name: str) -> None:
    if source.shape != target.shape:
        raise ValueError(
            f"{source_name} and {target_name} must have the same shape, got "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )


def _check_cxcywh_not_degenerate(boxes: Tensor, name: str) -> None:
    # Checked here, on the cxcywh input, so the error names the caller's argument; "all(w >= 0)"
    # rather than "any(w < 0)" so that NaN fails too.
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    if not bool((boxes[:, 2:] >= 0).all()):
        raise ValueError(
            f"{name} has a negative or NaN width/height: boxes must be cxcywh with w, h >= 0"
        )


def sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    num_boxes: NumBoxes,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """
    Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, Eq. 5),
    reduced as in Deformable DETR.

    Per element, with p = sigmoid(logit), p_t = p if target is 1 else 1 - p, and
    alpha_t = alpha if target is 1 else 1 - alpha:

        FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)

    (log(p_t) is computed as a binary cross-entropy with logits, which is stable for large
    logits; soft targets in [0, 1] interpolate both terms.) A negative ``alpha`` disables the
    alpha_t factor.

    Reduction, exactly: the per-element loss of shape (B, Q, C) is averaged over dim 1 (the
    queries), summed over everything else, and divided by ``num_boxes``. The mean over queries is
    undone by the caller (``SetCriterion`` multiplies by Q, like the authors' code), so the
    effective loss is the sum over all elements divided by ``num_boxes``.

    Args:
        logits: (B, Q, C) classification logits (any shape with at least 2 dims).
        targets: same shape as ``logits``, 1 for the matched class of a matched query, 0 elsewhere.
        num_boxes: normaliser, see the module docstring.
        alpha: weight of the positive term (1 - alpha for the negative term).
        gamma: focusing exponent.

    Returns:
        0-dim tensor.
    """
    _check_same_shape(logits, targets, "logits", "targets")
    if logits.dim() < 2:
        raise ValueError(
            f"logits must have at least 2 dims (B, Q, ...), got shape {tuple(logits.shape)}"
        )
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(
        logits, targets, reduction="none"
    )  # -log(p_t)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean(1).sum() / num_boxes


def l1_box_loss(src_boxes: Tensor, target_boxes: Tensor, num_boxes: NumBoxes) -> Tensor:
    """
    Sum over the matched boxes and their 4 coordinates of |src - target|, divided by ``num_boxes``.

    Args:
        src_boxes: (N, 4) matched predictions, normalised cxcywh.
        target_boxes: (N, 4) their targets, normalised cxcywh.
        num_boxes: normaliser, see the module docstring.

    Returns:
        0-dim tensor (0 when N == 0, still attached to ``src_boxes``' graph).
    """
    _check_same_shape(src_boxes, target_boxes, "src_boxes", "target_boxes")
    return F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes


def giou_box_loss(src_boxes: Tensor, target_boxes: Tensor, num_boxes: NumBoxes) -> Tensor:
    """
    sum_i (1 - GIoU(src_i, target_i)) / num_boxes, GIoU computed on xyxy (Rezatofighi et al. 2019).

    Args:
        src_boxes: (N, 4) matched predictions, normalised cxcywh.
        target_boxes: (N, 4) their targets, normalised cxcywh.
        num_boxes: normaliser, see the module docstring.

    Returns:
        0-dim tensor (0 when N == 0, still attached to ``src_boxes``' graph).
    """
    _check_same_shape(src_boxes, target_boxes, "src_boxes", "target_boxes")
    _check_cxcywh_not_degenerate(src_boxes, "src_boxes")
    _check_cxcywh_not_degenerate(target_boxes, "target_boxes")
    giou = elementwise_generalized_box_iou(
        box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)
    )
    return (1 - giou).sum() / num_boxes
