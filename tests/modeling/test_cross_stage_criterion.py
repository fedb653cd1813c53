"""The shared matcher and criterion's options for AdaMixer / StageInteractor: the L1 cost and loss on
normalised xyxy, and StageInteractor's cross-stage label assignment (hand-made cases)."""
import math

import pytest
import torch
from torch import nn

from deformable_family.modeling.box_ops import box_cxcywh_to_xyxy
from deformable_family.modeling.criterion import SetCriterion, cross_stage_class_targets
from deformable_family.modeling.losses import giou_box_loss, sigmoid_focal_loss
from deformable_family.modeling.matcher import HungarianMatcher

UNIT_WEIGHTS = {"loss_class": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}


class StageMatcher(nn.Module):
    """Returns the given per-stage indices, stage by stage in call order (the criterion matches the
    stages in order: aux_outputs then the final output)."""

    def __init__(self, per_stage):
        super().__init__()
        self.per_stage = per_stage
        self.calls = 0

    def forward(self, outputs, targets):
        indices = self.per_stage[self.calls % len(self.per_stage)]
        self.calls += 1
        return [
            (torch.tensor(q, dtype=torch.int64), torch.tensor(t, dtype=torch.int64))
            for q, t in indices
        ]


def test_l1_on_normalised_xyxy_in_matcher_and_criterion():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 4, generator=generator) * torch.tensor(
        [1.0, 1.0, 0.4, 0.4]
    ) + torch.tensor([0, 0, 0.05, 0.05])
    target = torch.rand(3, 4, generator=generator) * torch.tensor(
        [1.0, 1.0, 0.4, 0.4]
    ) + torch.tensor([0, 0, 0.05, 0.05])
    logits = torch.randn(5, 7, generator=generator)
    labels = torch.tensor([1, 4, 6])
    only_l1 = dict(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    xyxy_cost = HungarianMatcher(**only_l1, l1_box_format="xyxy").cost_matrix(
        logits, pred, labels, target
    )
    expected = (box_cxcywh_to_xyxy(pred)[:, None] - box_cxcywh_to_xyxy(target)[None]).abs().sum(-1)
    torch.testing.assert_close(xyxy_cost, expected)
    default_cost = HungarianMatcher(**only_l1).cost_matrix(logits, pred, labels, target)
    torch.testing.assert_close(default_cost, (pred[:, None] - target[None]).abs().sum(-1))
    assert not torch.allclose(xyxy_cost, default_cost)

    outputs = {"pred_logits": logits[None, :3], "pred_boxes": pred[None, :3]}
    targets = [{"labels": labels, "boxes": target}]
    matcher = StageMatcher([[([0, 1, 2], [2, 0, 1])]])
    criterion = SetCriterion(7, matcher, UNIT_WEIGHTS, l1_box_format="xyxy")
    loss = criterion(outputs, targets)["loss_bbox"]
    by_hand = (box_cxcywh_to_xyxy(pred[:3]) - box_cxcywh_to_xyxy(target[[2, 0, 1]])).abs().sum() / 3
    torch.testing.assert_close(loss, by_hand)


def test_l1_box_format_is_validated():
    with pytest.raises(ValueError, match="l1_box_format"):
        HungarianMatcher(l1_box_format="xywh")
    with pytest.raises(ValueError, match="l1_box_format"):
        SetCriterion(3, HungarianMatcher(), UNIT_WEIGHTS, l1_box_format="XYXY")
    with pytest.raises(ValueError, match="cross_stage_iou_threshold"):
        SetCriterion(3, HungarianMatcher(), UNIT_WEIGHTS, cross_stage_iou_threshold=0.0)


# A hand-made case: one image, targets g0 (class 1) and g1 (class 2), 4 queries, 4 stages.
TARGET_BOXES = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
TARGET_LABELS = torch.tensor([1, 2])
NEAR_G0 = [0.25, 0.25, 0.2, 0.2]  # IoU 1 with g0
SHIFTED_G0 = [0.30, 0.25, 0.2, 0.2]  # IoU 0.6 with g0 (>= 0.5)
FAR_G0 = [0.35, 0.25, 0.2, 0.2]  # IoU 1/3 with g0 (< 0.5)
NEAR_G1 = [0.7, 0.7, 0.2, 0.2]
ELSEWHERE = [0.5, 0.1, 0.1, 0.1]  # overlaps no target
# Per stage, the boxes of queries 0-3.
STAGE_BOXES = [
    [NEAR_G0, FAR_G0, ELSEWHERE, NEAR_G1],
    [SHIFTED_G0, NEAR_G0, ELSEWHERE, NEAR_G1],
    [FAR_G0, SHIFTED_G0, NEAR_G1, ELSEWHERE],
    [NEAR_G0, SHIFTED_G0, NEAR_G1, NEAR_G1],
]
# Per stage, (query_idx, target_idx) of its one-to-one matching.
STAGE_INDICES = [
    ([0, 2], [0, 1]),  # its match of g1 (query 2, ELSEWHERE) is a negative at stage 0
    ([1, 3], [0, 1]),
    ([0, 3], [0, 1]),  # both own matches below the threshold: negatives at stage 2
    ([1, 3], [0, 1]),
]


def expected_targets(stage: int) -> torch.Tensor:
    """By hand, from the rule: candidates {i, i-1, i+1, ..., 3}, IoU of stage i's box >= 0.5."""
    positives = {
        # Stages 0-3: g0 via q0 (own, IoU 1), q1 (stage 1: FAR_G0 here, no), q0 (stage 2), q1
        # (stage 3: no); g1 via q2 (own: ELSEWHERE, no), q3 (stages 1, 2, 3: NEAR_G1, yes).
        0: {(0, 1), (3, 2)},
        # Stages 1, 0, 2, 3: g0 via q1 (own), q0 (stages 0, 2: SHIFTED_G0, yes); g1 via q3 (own),
        # q2 (stage 0: ELSEWHERE here, no).
        1: {(1, 1), (0, 1), (3, 2)},
        # Stages 2, 1, 3 (not 0): own q0 -> g0 (FAR_G0) and q3 -> g1 (ELSEWHERE) are negatives;
        # g0 via q1 (stages 1, 3: SHIFTED_G0, yes). Stage 0's q2 -> g1 would be a positive here
        # (NEAR_G1) but stage 0 is out of scope.
        2: {(1, 1)},
        # Stages 3 and 2 only: g0 via q1 (own), q0 (stage 2: NEAR_G0 here); g1 via q3 (own).
        # Stage 0's q2 -> g1 is again out of scope.
        3: {(1, 1), (0, 1), (3, 2)},
    }[stage]
    target = torch.zeros(1, 4, 3)
    for query, label in positives:
        target[0, query, label] = 1
    return target


def stage_indices():
    return [[(torch.tensor(q), torch.tensor(t))] for q, t in STAGE_INDICES]


@pytest.mark.parametrize("stage", range(4))
def test_cross_stage_targets_on_a_hand_made_case(stage):
    targets = [{"labels": TARGET_LABELS, "boxes": TARGET_BOXES}]
    boxes = torch.tensor([STAGE_BOXES[stage]])
    class_targets = cross_stage_class_targets(stage, boxes, targets, stage_indices(), 3, 0.5)
    torch.testing.assert_close(class_targets, expected_targets(stage))


def test_cross_stage_targets_skip_images_without_targets():
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    empty = [[(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))]] * 2
    class_targets = cross_stage_class_targets(0, torch.rand(1, 3, 4), targets, empty, 5, 0.5)
    assert class_targets.shape == (1, 3, 5) and class_targets.sum() == 0


def test_cross_stage_losses_use_multi_hot_targets_and_own_matches():
    generator = torch.Generator().manual_seed(1)
    stage_outputs = [
        {
            "pred_logits": torch.randn(1, 4, 3, generator=generator),
            "pred_boxes": torch.tensor([boxes]),
        }
        for boxes in STAGE_BOXES
    ]
    outputs = dict(stage_outputs[-1], aux_outputs=stage_outputs[:-1])
    targets = [{"labels": TARGET_LABELS, "boxes": TARGET_BOXES}]
    matcher = StageMatcher([[indices] for indices in STAGE_INDICES])
    criterion = SetCriterion(
        3,
        matcher,
        {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        cross_stage_iou_threshold=0.5,
    )
    losses = criterion(outputs, targets)
    assert matcher.calls == 4
    assert set(losses) == {
        f"{name}{suffix}"
        for name in ("loss_class", "loss_bbox", "loss_giou")
        for suffix in ("_0", "_1", "_2", "")
    }
    for stage, suffix in enumerate(["_0", "_1", "_2", ""]):
        logits = stage_outputs[stage]["pred_logits"]
        target = expected_targets(stage)
        # Class: a sum over every (query, class) of the focal loss on the multi-hot targets,
        # divided by max(positives, own matches) = max(sum T, 2).
        normaliser = max(float(target.sum()), 2.0)
        focal = sum(
            _focal(float(logits[0, q, c]), float(target[0, q, c]))
            for q in range(4)
            for c in range(3)
        )
        assert losses["loss_class" + suffix].item() == pytest.approx(
            2.0 * focal / normaliser, rel=1e-5
        )
        # Boxes: the stage's own matches only, divided by their number (2).
        query_idx, target_idx = STAGE_INDICES[stage]
        src = torch.tensor(STAGE_BOXES[stage])[query_idx]
        tgt = TARGET_BOXES[target_idx]
        l1 = (src - tgt).abs().sum() / 2
        torch.testing.assert_close(losses["loss_bbox" + suffix], 5.0 * l1)
        torch.testing.assert_close(losses["loss_giou" + suffix], 2.0 * giou_box_loss(src, tgt, 2.0))
    # Stage 2's own matches below the threshold are negatives in its class target but still get
    # box losses (above), as in the authors' code.
    assert expected_targets(2)[0, [0, 3]].sum() == 0


def test_cross_stage_rejects_encoder_outputs():
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    outputs["enc_outputs"] = dict(outputs)
    criterion = SetCriterion(3, HungarianMatcher(), UNIT_WEIGHTS, cross_stage_iou_threshold=0.5)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(ValueError, match="enc_outputs"):
        criterion(outputs, targets)


def _focal(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def test_focal_sum_helper_matches_the_shared_loss():
    logits = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(2))
    target = expected_targets(3)
    by_hand = sum(
        _focal(float(logits[0, q, c]), float(target[0, q, c])) for q in range(4) for c in range(3)
    )
    assert 4 * sigmoid_focal_loss(logits, target, 1.0).item() == pytest.approx(by_hand, rel=1e-5)
