"""Hungarian matching between queries and target boxes, shared by the set-prediction detectors.

Each image is matched on its own: a (Q, n) cost matrix between its Q predictions and its n targets,
solved as a linear assignment with scipy (Kuhn 1955; Carion et al., "End-to-End Object Detection
with Transformers", ECCV 2020, Eq. 1). The cost is the weighted sum of one small function per term,
so another class cost (e.g. softmax probability for DETR) is one more function, not a second
matcher.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = [
    "HungarianMatcher",
    "focal_class_cost",
    "multi_label_focal_class_cost",
    "check_multi_hot_targets",
    "MULTI_HOT_KEY",
    "l1_box_cost",
    "giou_box_cost",
    "check_targets",
    "CheckedTargets",
]

# Added inside the logs of the focal class cost so that p = 0 or p = 1 gives a large finite cost,
# as in the Deformable DETR authors' code.
_LOG_EPS = 1e-8

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Target field of multi-label set prediction (e.g. DSCT's emotions): (n, C) with, per target, the
# 0/1 value every class logit of its matched query should take.
MULTI_HOT_KEY = "multi_hot_labels"


class CheckedTargets(list):
    """The targets of a batch, as returned by :func:`check_targets`: a list that remembers it was
    validated with labels in ``[0, num_classes)``, so that the matcher, called once per output set
    by the criterion, does not validate the same targets again."""

    def __init__(self, targets: Sequence[Dict[str, Tensor]], num_classes: int):
        super().__init__(targets)
        self.num_classes = num_classes


def check_targets(
    targets: Sequence[Dict[str, Tensor]], batch_size: int, num_classes: int
) -> CheckedTargets:
    """
    Validate the targets of a batch where they enter (the criterion), with one host sync for the
    values of the whole batch.

    Args:
        targets: list of ``batch_size`` dicts with "labels" (n,) int64 and "boxes" (n, 4).
        batch_size: B of the predictions.
        num_classes: labels must lie in [0, num_classes).

    Returns:
        the same dicts as a :class:`CheckedTargets` list.

    Raises:
        TypeError / ValueError naming the image index and the field at fault.
    """
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts, got {type(targets).__name__}")
    if len(targets) != batch_size:
        raise ValueError(
            f"targets has {len(targets)} entries but the predictions have batch size {batch_size}"
        )
    invalid_flags = []
    for image_index, target in enumerate(targets):
        for field in ("labels", "boxes"):
            if field not in target:
                raise ValueError(f"targets[{image_index}] has no '{field}' field")
        labels, boxes = target["labels"], target["boxes"]
        if labels.dim() != 1 or labels.dtype not in _INTEGER_DTYPES:
            raise ValueError(
                f"targets[{image_index}]['labels'] must be a 1-d integer tensor, got shape "
                f"{tuple(labels.shape)} and dtype {labels.dtype}"
            )
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"targets[{image_index}]['boxes'] must have shape (n, 4), got {tuple(boxes.shape)}"
            )
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{image_index}] has {labels.shape[0]} labels but {boxes.shape[0]} boxes"
            )
        if labels.numel() > 0:
            flag = _invalid_values(labels, boxes, num_classes)
            invalid_flags.append(flag.to(targets[0]["labels"].device))
    # One sync for the batch; the slow path below only runs to say what is wrong.
    if invalid_flags and bool(torch.stack(invalid_flags).any()):
        for image_index, target in enumerate(targets):
            labels, boxes = target["labels"], target["boxes"]
            # "all(w >= 0)" rather than "any(w < 0)" so that NaN fails too.
            boxes_valid = torch.isfinite(boxes).all() & (boxes[:, 2:] >= 0).all()
            if boxes.numel() > 0 and not bool(boxes_valid):
                raise ValueError(
                    f"targets[{image_index}]['boxes'] must be finite normalised cxcywh boxes with "
                    "w, h >= 0"
                )
            invalid = (labels < 0) | (labels >= num_classes)
            if bool(invalid.any()):
                bad_label = int(labels[invalid][0])
                raise ValueError(
                    f"targets[{image_index}]['labels'] has label {bad_label} outside "
                    f"[0, {num_classes})"
                )
    return CheckedTargets(targets, num_classes)


def _invalid_values(labels: Tensor, boxes: Tensor, num_classes: int) -> Tensor:
    """0-dim bool on the targets' device: any non-finite box, negative size or label outside
    [0, num_classes)."""
    boxes_valid = torch.isfinite(boxes).all() & (boxes[:, 2:] >= 0).all()
    return ~boxes_valid | ((labels < 0) | (labels >= num_classes)).any()


def _check_predictions_finite(image_index: int, pred_logits: Tensor, pred_boxes: Tensor) -> None:
    """Raise naming the image when its predictions hold NaN or inf (run only once an error was
    found, to say what it is: the predictions are not checked on the normal path)."""
    logits_finite = torch.isfinite(pred_logits[image_index]).all()
    if not bool(logits_finite & torch.isfinite(pred_boxes[image_index]).all()):
        raise ValueError(
            f"outputs['pred_logits'][{image_index}] or outputs['pred_boxes'][{image_index}] "
            "has NaN or inf entries: the model diverged or produced invalid predictions"
        )


def focal_class_cost(logits: Tensor, target_labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """
    Focal classification cost of Deformable DETR: the focal loss of predicting the target class as
    positive minus that of predicting it as negative, so a confident correct query costs < 0.

        pos = alpha * (1 - p) ** gamma * (-log(p + 1e-8))
        neg = (1 - alpha) * p ** gamma * (-log(1 - p + 1e-8))
        cost = pos - neg, taken at the target class

    Args:
        logits: (Q, C) class logits of one image.
        target_labels: (n,) int64 class indices.
        alpha, gamma: focal parameters.

    Returns:
        (Q, n) cost.
    """
    prob = logits.sigmoid()
    negative_cost = (1 - alpha) * prob ** gamma * (-(1 - prob + _LOG_EPS).log())
    positive_cost = alpha * (1 - prob) ** gamma * (-(prob + _LOG_EPS).log())
    return positive_cost[:, target_labels] - negative_cost[:, target_labels]


def check_multi_hot_targets(
    targets: Sequence[Dict[str, Tensor]], num_classes: int, min_width: Optional[int] = None
) -> None:
    """
    Validate the ``MULTI_HOT_KEY`` field of multi-label targets (``check_targets`` checks the rest).

    Args:
        targets: list of dicts with "labels" (n,) and ``MULTI_HOT_KEY`` (n, K) of 0/1 values.
        num_classes: the expected width K, or None to accept any width >= ``min_width``.
        min_width: with ``num_classes`` None, the smallest accepted K.

    Raises:
        ValueError naming the image index and the field at fault.
    """
    for image_index, target in enumerate(targets):
        if MULTI_HOT_KEY not in target:
            raise ValueError(
                f"targets[{image_index}] has no '{MULTI_HOT_KEY}' field, which multi-label "
                "matching and losses need"
            )
        multi_hot = target[MULTI_HOT_KEY]
        num_targets = target["labels"].shape[0]
        width_ok = (
            multi_hot.shape[-1] == num_classes
            if num_classes is not None
            else multi_hot.shape[-1] >= (min_width or 1)
        )
        if multi_hot.dim() != 2 or multi_hot.shape[0] != num_targets or not width_ok:
            expected = num_classes if num_classes is not None else f">= {min_width}"
            raise ValueError(
                f"targets[{image_index}]['{MULTI_HOT_KEY}'] must have shape ({num_targets}, "
                f"{expected}), got {tuple(multi_hot.shape)}"
            )
        if multi_hot.numel() > 0 and not bool(((multi_hot == 0) | (multi_hot == 1)).all()):
            raise ValueError(f"targets[{image_index}]['{MULTI_HOT_KEY}'] must hold only 0 and 1")


def multi_label_focal_class_cost(
    logits: Tensor, target_multi_hot: Tensor, alpha: float, gamma: float
) -> Tensor:
    """
    Multi-label focal classification cost of DSCT (its matcher with ``binary_flag``): the focal
    cost of ``focal_class_cost`` at every positive class of the target, averaged over all K
    classes (a mean over K, not over the positives: a target with more positive labels weighs more).

        cost(q, t) = 1/K * sum_k y[t, k] * (pos(p[q, k]) - neg(p[q, k]))

    Args:
        logits: (Q, K) class logits of one image.
        target_multi_hot: (n, K) 0/1 targets.
        alpha, gamma: focal parameters.

    Returns:
        (Q, n) cost.
    """
    prob = logits.sigmoid()
    negative_cost = (1 - alpha) * prob ** gamma * (-(1 - prob + _LOG_EPS).log())
    positive_cost = alpha * (1 - prob) ** gamma * (-(prob + _LOG_EPS).log())
    return (positive_cost - negative_cost) @ target_multi_hot.to(logits.dtype).t() / logits.shape[1]


def l1_box_cost(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """
    Args:
        pred_boxes: (Q, 4) normalised cxcywh.
        target_boxes: (n, 4) normalised cxcywh.

    Returns:
        (Q, n) L1 distance between the cxcywh vectors.
    """
    return torch.cdist(pred_boxes, target_boxes, p=1)


def giou_box_cost(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """
    Args:
        pred_boxes: (Q, 4) normalised cxcywh.
        target_boxes: (n, 4) normalised cxcywh.

    Returns:
        (Q, n) negative GIoU, computed on xyxy.
    """
    return -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment of queries to targets minimising, per image,

        cost_class * focal_class_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)).

    When an image has more queries than targets, the unmatched queries are background; with more
    targets than queries, only Q targets are matched.

    With ``multi_label`` the class cost is ``multi_label_focal_class_cost`` on the targets'
    ``MULTI_HOT_KEY`` vectors (DSCT); ``num_class_logits`` restricts the class cost to the first k
    logits (DSCT's last logit, subject-ness, is not part of its class cost).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        multi_label: bool = False,
        num_class_logits: Optional[int] = None,
    ):
        """
        Args:
            cost_class: weight of the focal classification cost.
            cost_bbox: weight of the L1 distance between normalised cxcywh boxes.
            cost_giou: weight of the negative GIoU.
            focal_alpha, focal_gamma: parameters of the focal classification cost.
            multi_label: targets carry ``MULTI_HOT_KEY`` (n, C) and the class cost is the
                multi-label focal cost on them instead of the focal cost at ``labels``.
            num_class_logits: k, use only the first k logits (and the first k columns of the
                multi-hot targets) in the class cost; None uses all.
        """
        super().__init__()
        weights = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou}
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        if all(weight == 0 for weight in weights.values()):
            raise ValueError(
                "cost_class, cost_bbox and cost_giou cannot all be 0: the matching would be "
                "arbitrary"
            )
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        if num_class_logits is not None and (
            not isinstance(num_class_logits, int)
            or isinstance(num_class_logits, bool)
            or num_class_logits < 1
        ):
            raise ValueError(
                f"num_class_logits must be None or a positive int, got {num_class_logits!r}"
            )
        self.multi_label = bool(multi_label)
        self.num_class_logits = num_class_logits

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """(Q, C) logits, (n,) labels -> (Q, n) classification cost; override for another cost."""
        return focal_class_cost(logits, target_labels, self.focal_alpha, self.focal_gamma)

    def cost_matrix(
        self,
        logits: Tensor,
        pred_boxes: Tensor,
        target_labels: Tensor,
        target_boxes: Tensor,
        target_multi_hot: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            logits: (Q, C) class logits of one image.
            pred_boxes: (Q, 4) normalised cxcywh.
            target_labels: (n,) int64.
            target_boxes: (n, 4) normalised cxcywh.
            target_multi_hot: (n, C) 0/1 class targets, required with ``multi_label``.

        Returns:
            (Q, n) float32 total cost.
        """
        # float32 so the costs of fp16/bf16 predictions do not lose the small differences that
        # decide the assignment.
        logits, pred_boxes, target_boxes = logits.float(), pred_boxes.float(), target_boxes.float()
        if self.num_class_logits is not None:
            logits = logits[:, : self.num_class_logits]
        if self.multi_label:
            if target_multi_hot is None:
                raise ValueError(f"multi_label matching needs the targets' '{MULTI_HOT_KEY}'")
            target_multi_hot = target_multi_hot[:, : logits.shape[1]]
            class_cost = multi_label_focal_class_cost(
                logits, target_multi_hot, self.focal_alpha, self.focal_gamma
            )
        else:
            class_cost = self.class_cost(logits, target_labels)
        return (
            self.cost_class * class_cost
            + self.cost_bbox * l1_box_cost(pred_boxes, target_boxes)
            + self.cost_giou * giou_box_cost(pred_boxes, target_boxes)
        )

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: {"pred_logits": (B, Q, C) logits, "pred_boxes": (B, Q, 4) normalised cxcywh};
                other keys are ignored.
            targets: list of B dicts {"labels": (n_b,) int64, "boxes": (n_b, 4) normalised cxcywh};
                validated here unless it is the :class:`CheckedTargets` that ``check_targets``
                returned (the criterion validates once for all its output sets).

        Returns:
            list of B tuples (query_idx, target_idx), int64 CPU tensors of length min(Q, n_b),
            sorted by query_idx: query ``query_idx[k]`` is matched to target ``target_idx[k]``.
        """
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise ValueError(f"outputs has no '{key}' entry")
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if pred_logits.dim() != 3:
            raise ValueError(
                f"outputs['pred_logits'] must have shape (B, Q, C), got {tuple(pred_logits.shape)}"
            )
        if pred_boxes.shape != pred_logits.shape[:2] + (4,):
            raise ValueError(
                "outputs['pred_boxes'] must have shape (B, Q, 4) = "
                f"{tuple(pred_logits.shape[:2]) + (4,)}, got {tuple(pred_boxes.shape)}"
            )
        batch_size, _, num_classes = pred_logits.shape
        if self.num_class_logits is not None and self.num_class_logits > num_classes:
            raise ValueError(
                f"num_class_logits ({self.num_class_logits}) exceeds the {num_classes} logits of "
                "outputs['pred_logits']"
            )
        if not (
            isinstance(targets, CheckedTargets)
            and len(targets) == batch_size
            and targets.num_classes <= num_classes
        ):
            targets = check_targets(targets, batch_size, num_classes)
            if self.multi_label:
                check_multi_hot_targets(targets, None, self.num_class_logits or num_classes)

        costs = {}
        for image_index, target in enumerate(targets):
            if target["labels"].numel() == 0:
                continue
            try:
                costs[image_index] = self.cost_matrix(
                    pred_logits[image_index],
                    pred_boxes[image_index],
                    target["labels"],
                    target["boxes"],
                    target.get(MULTI_HOT_KEY) if self.multi_label else None,
                )
            except ValueError as error:
                _check_predictions_finite(image_index, pred_logits, pred_boxes)
                # The box ops name their arguments boxes1 (predictions) and boxes2 (targets):
                # say which image.
                raise ValueError(f"matching image {image_index}: {error}") from error
        # One device-to-host copy for the batch (scipy solves on the CPU).
        if costs:
            flat = torch.cat([cost.flatten() for cost in costs.values()]).cpu()
            costs = dict(zip(costs, flat.split([cost.numel() for cost in costs.values()])))

        indices = []
        for image_index, target in enumerate(targets):
            if image_index not in costs:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = costs[image_index].view(pred_logits.shape[1], -1)
            if not bool(torch.isfinite(cost).all()):
                _check_predictions_finite(image_index, pred_logits, pred_boxes)
                raise ValueError(
                    f"the matching cost of image {image_index} has NaN or inf entries: check "
                    f"outputs['pred_logits'][{image_index}], "
                    f"outputs['pred_boxes'][{image_index}] and targets[{image_index}]"
                )
            query_idx, target_idx = linear_sum_assignment(cost.numpy())
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64),
                    torch.as_tensor(target_idx, dtype=torch.int64),
                )
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}, multi_label={self.multi_label}, "
            f"num_class_logits={self.num_class_logits}"
        )
