"""Box utilities shared by the matcher, the losses and the detectors of the family.

Two box formats appear here:

- ``cxcywh``: (centre x, centre y, width, height), the format the detection heads predict and the
  targets use (normalised to [0, 1] by the unpadded image size).
- ``xyxy``: (x0, y0, x1, y1), the format IoU and GIoU are defined on.

Pairwise functions compare every box of one set with every box of the other and return (N, M);
``elementwise_*`` functions compare box i with box i and return (N,). GIoU follows Rezatofighi
et al., "Generalized Intersection over Union", CVPR 2019, Algorithm 1:
GIoU = IoU - (|C| - |A u B|) / |C|, where C is the smallest box enclosing A and B.
"""
from typing import Tuple

import torch
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "inverse_sigmoid",
]


def _check_last_dim_is_four(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name} must have a last dimension of size 4, got shape {tuple(boxes.shape)}"
        )


def _check_box_list(boxes: Tensor, name: str) -> None:
    _check_last_dim_is_four(boxes, name)
    if boxes.dim() != 2:
        raise ValueError(f"{name} must have shape (N, 4), got {tuple(boxes.shape)}")


def _check_not_degenerate(boxes: Tensor, name: str) -> None:
    # Written as "all(x1 >= x0)" rather than "any(x1 < x0)" so that NaN coordinates fail the check:
    # every comparison with NaN is False. A reversed box would give a negative area and a GIoU
    # outside [-1, 1], which silently corrupts the matching cost and the loss.
    if not bool((boxes[:, 2:] >= boxes[:, :2]).all()):
        raise ValueError(
            f"{name} has degenerate xyxy boxes: x1 >= x0 and y1 >= y0 must hold and no coordinate "
            "may be NaN (predicted boxes with NaN usually mean the training diverged)"
        )


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """
    Args:
        boxes: (..., 4) as (cx, cy, w, h).

    Returns:
        (..., 4) as (x0, y0, x1, y1), in the same units.
    """
    _check_last_dim_is_four(boxes, "boxes")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """
    Args:
        boxes: (..., 4) as (x0, y0, x1, y1).

    Returns:
        (..., 4) as (cx, cy, w, h), in the same units.
    """
    _check_last_dim_is_four(boxes, "boxes")
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """
    Args:
        boxes: (..., 4) xyxy.

    Returns:
        (...,) the area (x1 - x0) * (y1 - y0); negative for reversed boxes (not checked here).
    """
    _check_last_dim_is_four(boxes, "boxes")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """
    Pairwise IoU.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.

    Returns:
        iou: (N, M), intersection / union.
        union: (N, M), area1 + area2 - intersection (``generalized_box_iou`` reuses it).
    """
    _check_box_list(boxes1, "boxes1")
    _check_box_list(boxes2, "boxes2")
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)
    intersection = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - intersection
    return intersection / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """
    Pairwise generalized IoU (Rezatofighi et al. 2019, Algorithm 1), in [-1, 1].

    Args:
        boxes1: (N, 4) xyxy with x1 >= x0 and y1 >= y0.
        boxes2: (M, 4) xyxy with x1 >= x0 and y1 >= y0.

    Returns:
        (N, M) GIoU = IoU - (area(C) - union) / area(C), C the smallest enclosing box.

    Raises:
        ValueError naming ``boxes1`` or ``boxes2`` when a box is reversed or has a NaN coordinate.
    """
    _check_box_list(boxes1, "boxes1")
    _check_box_list(boxes2, "boxes2")
    _check_not_degenerate(boxes1, "boxes1")
    _check_not_degenerate(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing_area = wh[..., 0] * wh[..., 1]
    return iou - (enclosing_area - union) / enclosing_area


def _elementwise_iou_union(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must have the same shape (N, 4), got {tuple(boxes1.shape)} and "
            f"{tuple(boxes2.shape)}"
        )
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    intersection = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - intersection
    return intersection / union, union


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """
    IoU of box i of ``boxes1`` with box i of ``boxes2``: the diagonal of ``box_iou`` without the
    (N, N) matrix.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (N, 4) xyxy.

    Returns:
        (N,) IoU.
    """
    _check_box_list(boxes1, "boxes1")
    _check_box_list(boxes2, "boxes2")
    iou, _ = _elementwise_iou_union(boxes1, boxes2)
    return iou


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """
    GIoU of box i of ``boxes1`` with box i of ``boxes2``: the diagonal of ``generalized_box_iou``.

    Args:
        boxes1: (N, 4) xyxy with x1 >= x0 and y1 >= y0.
        boxes2: (N, 4) xyxy with x1 >= x0 and y1 >= y0.

    Returns:
        (N,) GIoU in [-1, 1].

    Raises:
        ValueError naming ``boxes1`` or ``boxes2`` when a box is reversed or has a NaN coordinate.
    """
    _check_box_list(boxes1, "boxes1")
    _check_box_list(boxes2, "boxes2")
    _check_not_degenerate(boxes1, "boxes1")
    _check_not_degenerate(boxes2, "boxes2")
    iou, union = _elementwise_iou_union(boxes1, boxes2)
    top_left = torch.min(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing_area = wh[:, 0] * wh[:, 1]
    return iou - (enclosing_area - union) / enclosing_area


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """
    The logit log(x / (1 - x)), with x clamped to [0, 1] and both x and 1 - x clamped below by
    ``eps`` so that 0 and 1 map to finite values (about -/+11.5 for eps = 1e-5), as in the
    Deformable DETR authors' code. Used to refine boxes in logit space:
    box = sigmoid(delta + inverse_sigmoid(reference)).

    Args:
        x: any shape, values expected in [0, 1].
        eps: lower clamp of x and 1 - x.

    Returns:
        same shape as ``x``.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
