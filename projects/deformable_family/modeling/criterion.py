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

from .losses import giou_box_loss, l1_box_loss, sigmoid_focal_loss
from .matcher import MULTI_HOT_KEY, CheckedTargets, check_multi_hot_targets, check_targets

__all__ = ["SetCriterion", "compute_num_boxes"]

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
            "loss_bbox": l1_box_loss(src_boxes, target_boxes, num_boxes),
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
            f"multi_label={self.multi_label}, num_class_logits={self.num_class_logits}"
        )
