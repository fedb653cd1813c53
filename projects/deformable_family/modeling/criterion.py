"""Set criterion with deep supervision, shared by the set-prediction detectors of the family.

For each output set (final layer, every earlier decoder layer, two-stage encoder proposals) the
predictions are matched to the targets on their own, then three losses are computed on the
assignment: sigmoid focal classification, L1 and GIoU box losses, all divided by the same
``num_boxes``. The returned dict holds losses already multiplied by their weights, since
detectron2's trainer sums the dict.
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, box_iou
from .losses import giou_box_loss, l1_box_loss, sigmoid_focal_loss
from .matcher import (
    MULTI_HOT_KEY,
    CheckedTargets,
    boxes_in_l1_format,
    check_l1_box_format,
    check_multi_hot_targets,
    check_targets,
)

__all__ = ["SetCriterion", "compute_num_boxes", "cross_stage_class_targets"]

LOSS_NAMES = ("loss_class", "loss_bbox", "loss_giou")


def compute_num_boxes(
    targets: Sequence[Dict[str, Tensor]], device: Union[torch.device, str]
) -> float:
    """
    The loss normaliser: the number of target boxes per worker, averaged over all workers.

    num_boxes = max(1, sum over workers of the local target count / world size). The sum is an
    all_reduce when torch.distributed is initialised (every worker must call this, even with zero
    targets); without it, the local count. The clamp keeps a batch with no targets at all from
    dividing by zero: its box losses are 0 and its classification loss is a plain sum.

    Args:
        targets: list of dicts with "labels" (n,).
        device: where to run the all_reduce (the device of the predictions, so NCCL works).

    Returns:
        num_boxes as a Python float.
    """
    num_boxes = torch.as_tensor(
        [float(sum(len(target["labels"]) for target in targets))],
        dtype=torch.float64,
        device=device,
    )
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1).item()


def _matched_positions(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """(image index, query index) of every matched prediction, concatenated over images."""
    batch_idx = torch.cat(
        [
            torch.full_like(query_idx, image_index)
            for image_index, (query_idx, _) in enumerate(indices)
        ]
    )
    query_idx = torch.cat([query_idx for query_idx, _ in indices])
    return batch_idx, query_idx


class SetCriterion(nn.Module):
    """
    Losses of a set-prediction detector with deep supervision: DETR's Hungarian loss with the
    sigmoid focal classification loss of Deformable DETR (weight 2 in its implementation details),
    also applied to the two-stage proposals (Deformable DETR, appendix A.4).

    Keys of the returned dict: ``loss_class``, ``loss_bbox``, ``loss_giou`` for the final output;
    the same with suffix ``_{i}`` for ``outputs["aux_outputs"][i]`` and ``_enc`` for
    ``outputs["enc_outputs"]``. Every output set uses the same three base weights, so the number of
    auxiliary losses follows the number of decoder layers with no change to the weights.

    Multi-label set prediction (DSCT): with ``multi_label`` the class target of a matched query is
    its target's ``MULTI_HOT_KEY`` vector instead of the one-hot of its label (unmatched queries
    stay all-zero); with ``num_class_logits`` = k only the first k logits enter the
    classification loss (DSCT on CAER-S: 7 emotions, the 8th logit is never trained).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Mapping[str, float] = {
            "loss_class": 2.0,
            "loss_bbox": 5.0,
            "loss_giou": 2.0,
        },  # noqa: B006
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        multi_label: bool = False,
        num_class_logits: Optional[int] = None,
        l1_box_format: str = "cxcywh",
        cross_stage_iou_threshold: Optional[float] = None,
    ):
        """
        Args:
            num_classes: C, the number of foreground classes (no background class: sigmoid scores).
            matcher: called as ``matcher(outputs, targets)``, returns per image
                (query_idx, target_idx), e.g. ``HungarianMatcher``.
            weight_dict: weight of each of "loss_class", "loss_bbox", "loss_giou" (all three
                required; the dict is copied, never modified).
            focal_alpha, focal_gamma: parameters of the sigmoid focal loss.
            multi_label: targets carry ``MULTI_HOT_KEY`` (n, num_classes) 0/1 class targets.
            num_class_logits: k, classification loss on the first k logits only; None: all.
            l1_box_format: coordinates of the L1 loss, both normalised by the image size: "cxcywh"
                (Deformable DETR) or "xyxy" (mmdetection's L1Loss in AdaMixer / StageInteractor).
            cross_stage_iou_threshold: None (default): each output set's class target is the
                one-hot of its own matches. A threshold t switches to StageInteractor's cross-stage
                label assignment (see ``cross_stage_class_targets``): multi-hot class targets from
                the matches of several stages, kept where this stage's box has IoU >= t with the
                matched target; the class loss is divided by the mean over workers of
                max(number of positive targets, own matches) and the box losses by the mean of
                the own matches, per stage. The output sets are the stages in order
                (``aux_outputs`` then the final one); ``enc_outputs`` is not supported there.
        """
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not callable(matcher):
            raise TypeError(
                f"matcher must be callable (e.g. HungarianMatcher), got {type(matcher).__name__}"
            )
        missing = [name for name in LOSS_NAMES if name not in weight_dict]
        unknown = [name for name in weight_dict if name not in LOSS_NAMES]
        if missing or unknown:
            raise ValueError(
                f"weight_dict must have exactly the keys {list(LOSS_NAMES)} (auxiliary and encoder "
                f"losses reuse them); missing {missing}, unknown {unknown}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {name: float(weight_dict[name]) for name in LOSS_NAMES}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        if num_class_logits is not None and (
            not isinstance(num_class_logits, int)
            or isinstance(num_class_logits, bool)
            or not 1 <= num_class_logits <= num_classes
        ):
            raise ValueError(
                f"num_class_logits must be None or an int in [1, num_classes={num_classes}], "
                f"got {num_class_logits!r}"
            )
        self.multi_label = bool(multi_label)
        self.num_class_logits = num_class_logits
        check_l1_box_format(l1_box_format)
        self.l1_box_format = l1_box_format
        if cross_stage_iou_threshold is not None and not 0.0 < cross_stage_iou_threshold <= 1.0:
            raise ValueError(
                f"cross_stage_iou_threshold must be None or in (0, 1], got {cross_stage_iou_threshold!r}"
            )
        self.cross_stage_iou_threshold = cross_stage_iou_threshold
        if cross_stage_iou_threshold is not None and (multi_label or num_class_logits is not None):
            raise ValueError(
                "cross_stage_iou_threshold (StageInteractor) cannot be combined with multi_label or "
                "num_class_logits"
            )

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: {"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4) normalised cxcywh,
                optional "aux_outputs": list of dicts with the same two keys, one per earlier
                decoder layer, optional "enc_outputs": dict with the same two keys, pred_logits
                (B, S, 1) or (B, S, C), for the two-stage proposals}.
            targets: list of B dicts {"labels": (n,) int64 in [0, num_classes), "boxes": (n, 4)
                normalised cxcywh}.

        Returns:
            dict of weighted 0-dim losses, see the class docstring for the keys.
        """
        pred_logits = outputs["pred_logits"]
        # Validated once here, where the targets enter; the matcher does not validate a
        # CheckedTargets list again for each output set.
        targets = check_targets(targets, pred_logits.shape[0], self.num_classes)
        if self.multi_label:
            check_multi_hot_targets(targets, self.num_classes)
        if self.cross_stage_iou_threshold is not None:
            return self._cross_stage_losses(outputs, targets)
        num_boxes = compute_num_boxes(targets, pred_logits.device)

        losses = self._losses_of(
            outputs,
            targets,
            num_boxes,
            "",
            "outputs",
            self.num_classes,
            self.multi_label,
            self.num_class_logits,
        )
        for layer_index, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            output_name = f"outputs['aux_outputs'][{layer_index}]"
            losses.update(
                self._losses_of(
                    aux_outputs,
                    targets,
                    num_boxes,
                    f"_{layer_index}",
                    output_name,
                    self.num_classes,
                    self.multi_label,
                    self.num_class_logits,
                )
            )
        if "enc_outputs" in outputs:
            enc_outputs = outputs["enc_outputs"]
            # The proposals are scored as foreground vs. background: every target becomes class 0,
            # as in the authors' code. With C proposal logits (as they have), column 0 learns
            # foreground and the other columns are always negatives.
            binary_targets = CheckedTargets(
                [
                    {"labels": torch.zeros_like(target["labels"]), "boxes": target["boxes"]}
                    for target in targets
                ],
                num_classes=1,
            )
            num_enc_classes = enc_outputs["pred_logits"].shape[-1]
            losses.update(
                self._losses_of(
                    enc_outputs,
                    binary_targets,
                    num_boxes,
                    "_enc",
                    "outputs['enc_outputs']",
                    num_enc_classes,
                )
            )
        return losses

    def _losses_of(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        num_boxes: float,
        suffix: str,
        output_name: str,
        num_classes: int,
        multi_label: bool = False,
        num_class_logits: Optional[int] = None,
    ) -> Dict[str, Tensor]:
        """
        Match one output set and return its three weighted losses, keys suffixed with ``suffix``;
        ``output_name`` says which set in error messages, ``num_classes`` is its expected number
        of logits; ``multi_label`` takes the class targets from ``MULTI_HOT_KEY`` and
        ``num_class_logits`` keeps the first k logits in the class loss (neither is used for the
        two-stage proposals, which are scored as foreground vs. background).
        """
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise ValueError(f"{output_name} has no '{key}' entry")
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if pred_logits.dim() != 3 or pred_logits.shape[-1] != num_classes:
            raise ValueError(
                f"{output_name}['pred_logits'] must have shape (B, Q, {num_classes}), "
                f"got {tuple(pred_logits.shape)}"
            )
        indices = self.matcher(outputs, targets)
        device = pred_logits.device
        indices = [
            (query_idx.to(device), target_idx.to(device)) for query_idx, target_idx in indices
        ]
        batch_idx, query_idx = _matched_positions(indices)

        matched_targets = [
            (target, target_idx) for target, (_, target_idx) in zip(targets, indices)
        ]
        target_onehot = torch.zeros_like(pred_logits)
        if multi_label:
            target_onehot[batch_idx, query_idx] = torch.cat(
                [target[MULTI_HOT_KEY][target_idx] for target, target_idx in matched_targets]
            ).to(target_onehot.dtype)
        else:
            target_labels = torch.cat(
                [target["labels"][target_idx] for target, target_idx in matched_targets]
            )
            target_onehot[batch_idx, query_idx, target_labels.long()] = 1
        class_logits = pred_logits
        if num_class_logits is not None:
            class_logits = pred_logits[..., :num_class_logits]
            target_onehot = target_onehot[..., :num_class_logits]
        # sigmoid_focal_loss averages over the queries; multiplying by Q makes it a sum over
        # queries, as in the authors' code, so the classification loss does not shrink with more
        # queries.
        num_queries = pred_logits.shape[1]
        loss_class = num_queries * sigmoid_focal_loss(
            class_logits, target_onehot, num_boxes, self.focal_alpha, self.focal_gamma
        )

        src_boxes = pred_boxes[batch_idx, query_idx]
        target_boxes = torch.cat(
            [target["boxes"][target_idx] for target, target_idx in matched_targets]
        )
        target_boxes = target_boxes.to(src_boxes.dtype)
        unweighted = {
            "loss_class": loss_class,
            "loss_bbox": l1_box_loss(
                boxes_in_l1_format(src_boxes, self.l1_box_format),
                boxes_in_l1_format(target_boxes, self.l1_box_format),
                num_boxes,
            ),
            "loss_giou": giou_box_loss(src_boxes, target_boxes, num_boxes),
        }
        return {
            loss_name + suffix: self.weight_dict[loss_name] * loss
            for loss_name, loss in unweighted.items()
        }

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, "
            f"multi_label={self.multi_label}, num_class_logits={self.num_class_logits}, "
            f"l1_box_format={self.l1_box_format}, "
            f"cross_stage_iou_threshold={self.cross_stage_iou_threshold}"
        )

    def _cross_stage_losses(
        self, outputs: Dict, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """StageInteractor's losses: every stage matched on its own, then per stage the focal loss
        on the cross-stage multi-hot targets and the box losses on the stage's own matches."""
        if "enc_outputs" in outputs:
            raise ValueError("cross-stage label assignment does not support outputs['enc_outputs']")
        stage_outputs = list(outputs.get("aux_outputs", [])) + [outputs]
        names = [f"outputs['aux_outputs'][{i}]" for i in range(len(stage_outputs) - 1)] + [
            "outputs"
        ]
        suffixes = [f"_{i}" for i in range(len(stage_outputs) - 1)] + [""]
        for stage_output, name in zip(stage_outputs, names):
            for key in ("pred_logits", "pred_boxes"):
                if key not in stage_output:
                    raise ValueError(f"{name} has no '{key}' entry")
            if stage_output["pred_logits"].shape != outputs["pred_logits"].shape:
                raise ValueError(
                    f"{name}['pred_logits'] must have shape {tuple(outputs['pred_logits'].shape)} "
                    f"like every stage, got {tuple(stage_output['pred_logits'].shape)}"
                )
        device = outputs["pred_logits"].device
        stage_indices = [
            [
                (query_idx.to(device), target_idx.to(device))
                for query_idx, target_idx in self.matcher(o, targets)
            ]
            for o in stage_outputs
        ]
        class_targets = [
            cross_stage_class_targets(
                stage,
                o["pred_boxes"],
                targets,
                stage_indices,
                self.num_classes,
                self.cross_stage_iou_threshold,
            )
            for stage, o in enumerate(stage_outputs)
        ]
        own_matches = [
            float(sum(len(query_idx) for query_idx, _ in indices)) for indices in stage_indices
        ]
        # One all_reduce for every normaliser: [class normalisers of all stages, box normalisers].
        local = torch.tensor(
            [max(float(t.sum()), own) for t, own in zip(class_targets, own_matches)] + own_matches,
            dtype=torch.float64,
            device=device,
        )
        normalisers = _mean_over_workers(local).clamp(min=1).tolist()
        num_stages = len(stage_outputs)

        losses = {}
        for stage, (stage_output, indices) in enumerate(zip(stage_outputs, stage_indices)):
            pred_logits, pred_boxes = stage_output["pred_logits"], stage_output["pred_boxes"]
            class_normaliser, box_normaliser = normalisers[stage], normalisers[num_stages + stage]
            # x Q: a sum over queries, as in _losses_of.
            loss_class = pred_logits.shape[1] * sigmoid_focal_loss(
                pred_logits,
                class_targets[stage],
                class_normaliser,
                self.focal_alpha,
                self.focal_gamma,
            )
            batch_idx, query_idx = _matched_positions(indices)
            src_boxes = pred_boxes[batch_idx, query_idx]
            target_boxes = torch.cat(
                [target["boxes"][target_idx] for target, (_, target_idx) in zip(targets, indices)]
            ).to(src_boxes.dtype)
            unweighted = {
                "loss_class": loss_class,
                "loss_bbox": l1_box_loss(
                    boxes_in_l1_format(src_boxes, self.l1_box_format),
                    boxes_in_l1_format(target_boxes, self.l1_box_format),
                    box_normaliser,
                ),
                "loss_giou": giou_box_loss(src_boxes, target_boxes, box_normaliser),
            }
            losses.update(
                {
                    name + suffixes[stage]: self.weight_dict[name] * loss
                    for name, loss in unweighted.items()
                }
            )
        return losses


def _mean_over_workers(values: Tensor) -> Tensor:
    """The element-wise mean of ``values`` over the workers (all_reduce when distributed)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        return values / dist.get_world_size()
    return values


@torch.no_grad()
def cross_stage_class_targets(
    stage: int,
    stage_boxes: Tensor,
    targets: Sequence[Dict[str, Tensor]],
    stage_indices: Sequence[Sequence[Tuple[Tensor, Tensor]]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> Tensor:
    """
    StageInteractor's cross-stage label assignment (Teng et al., ICCV 2023, Sec. 3.2; supplementary
    Sec. J: scope [i - 1, L], threshold 0.5), as the authors' code computes it: for stage i,

        T[b, q, c] = 1  iff  for some stage s in {i, i - 1, i + 1, ..., S - 1} (i - 1 only if i >= 1),
                             query q of image b was matched at stage s to a target g of class c
                             and IoU(stage i's box of q, g) >= iou_threshold.

    The stage's own matches pass the same test (an own match below the threshold is a negative).

    Args:
        stage: i.
        stage_boxes: (B, Q, 4) normalised cxcywh boxes of stage i.
        targets: B dicts with "labels" (n,) and "boxes" (n, 4) normalised cxcywh.
        stage_indices: per stage, per image, (query_idx, target_idx) of its one-to-one matching.
        num_classes: C.
        iou_threshold: the IoU a target's box must reach with stage i's box.

    Returns:
        (B, Q, C) float 0/1 targets in ``stage_boxes``' dtype.
    """
    num_stages = len(stage_indices)
    candidates = [stage] + ([stage - 1] if stage >= 1 else []) + list(range(stage + 1, num_stages))
    batch_size, num_queries = stage_boxes.shape[:2]
    class_targets = stage_boxes.new_zeros(batch_size, num_queries, num_classes)
    for image_index, target in enumerate(targets):
        if target["labels"].numel() == 0:
            continue
        iou, _ = box_iou(
            box_cxcywh_to_xyxy(stage_boxes[image_index].float()),
            box_cxcywh_to_xyxy(target["boxes"].float()),
        )
        for candidate in candidates:
            query_idx, target_idx = stage_indices[candidate][image_index]
            keep = iou[query_idx, target_idx] >= iou_threshold
            class_targets[image_index, query_idx[keep], target["labels"][target_idx[keep]]] = 1
    return class_targets
