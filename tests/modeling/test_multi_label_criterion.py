"""Multi-label matching and losses (DSCT) of the shared HungarianMatcher / SetCriterion."""

import math

import pytest
import torch

from deformable_family.modeling.criterion import SetCriterion
from deformable_family.modeling.matcher import (
    MULTI_HOT_KEY,
    HungarianMatcher,
    multi_label_focal_class_cost,
)


def _focal_terms(prob, alpha=0.25, gamma=2.0):
    pos = alpha * (1 - prob) ** gamma * (-math.log(prob + 1e-8))
    neg = (1 - alpha) * prob**gamma * (-math.log(1 - prob + 1e-8))
    return pos, neg


def test_multi_label_cost_by_hand():
    # One query with probabilities (0.9, 0.2, 0.5); two targets with labels {0, 2} and {1}.
    probs = torch.tensor([[0.9, 0.2, 0.5]], dtype=torch.float64)
    logits = torch.log(probs / (1 - probs))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    cost = multi_label_focal_class_cost(logits, targets, 0.25, 2.0)
    terms = [_focal_terms(p) for p in (0.9, 0.2, 0.5)]
    expected_0 = ((terms[0][0] - terms[0][1]) + (terms[2][0] - terms[2][1])) / 3  # mean over K = 3
    expected_1 = (terms[1][0] - terms[1][1]) / 3
    assert cost.shape == (1, 2)
    assert cost[0, 0].item() == pytest.approx(expected_0, rel=1e-9)
    assert cost[0, 1].item() == pytest.approx(expected_1, rel=1e-9)


def _emotic_like_batch():
    # 2 images, 3 queries, 4 logits = 3 emotions + subject-ness; targets [emotions, 1].
    torch.manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 3, 4, requires_grad=True),
        "pred_boxes": torch.tensor(
            [
                [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]],
                [[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1]],
            ],
            requires_grad=True,
        ),
    }
    targets = [
        {
            "labels": torch.zeros(2, dtype=torch.int64),
            "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]),
            MULTI_HOT_KEY: torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]),
        },
        {
            "labels": torch.zeros(1, dtype=torch.int64),
            "boxes": torch.tensor([[0.6, 0.6, 0.1, 0.1]]),
            MULTI_HOT_KEY: torch.tensor([[1.0, 1.0, 1.0, 1.0]]),
        },
    ]
    return outputs, targets


def test_multi_label_class_loss_is_focal_loss_on_the_matched_vectors():
    outputs, targets = _emotic_like_batch()
    # Boxes alone decide the matching: query 2 <- target 0 and query 0 <- target 1 in image 0,
    # query 1 <- target 0 in image 1.
    matcher = HungarianMatcher(
        cost_class=0.0, cost_bbox=1.0, cost_giou=0.0, multi_label=True, num_class_logits=3
    )
    criterion = SetCriterion(
        4, matcher, {"loss_class": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}, multi_label=True
    )
    losses = criterion(outputs, targets)
    expected_targets = torch.zeros(2, 3, 4)
    expected_targets[0, 2] = targets[0][MULTI_HOT_KEY][0]
    expected_targets[0, 0] = targets[0][MULTI_HOT_KEY][1]
    expected_targets[1, 1] = targets[1][MULTI_HOT_KEY][0]
    prob = outputs["pred_logits"].detach().sigmoid().double()
    y = expected_targets.double()
    p_t = prob * y + (1 - prob) * (1 - y)
    alpha_t = 0.25 * y + 0.75 * (1 - y)
    direct = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).sum() / 3  # num_boxes = 3
    assert losses["loss_class"].item() == pytest.approx(direct.item(), rel=1e-5)


def test_class_loss_on_the_first_k_logits_leaves_the_rest_untrained():
    outputs, targets = _emotic_like_batch()
    single = [{"labels": torch.tensor([2, 0]), "boxes": targets[0]["boxes"]}]
    single.append({"labels": torch.tensor([1]), "boxes": targets[1]["boxes"]})
    matcher = HungarianMatcher(num_class_logits=3)
    criterion = SetCriterion(4, matcher, num_class_logits=3)
    losses = criterion(outputs, single)
    losses["loss_class"].backward()
    grad = outputs["pred_logits"].grad
    assert grad[..., 3].abs().max() == 0
    assert grad[..., :3].abs().max() > 0
    # The same loss as a 3-logit criterion on the first 3 logits.
    outputs3 = {
        "pred_logits": outputs["pred_logits"].detach()[..., :3],
        "pred_boxes": outputs["pred_boxes"],
    }
    reference = SetCriterion(3, HungarianMatcher())(outputs3, single)
    assert losses["loss_class"].item() == pytest.approx(reference["loss_class"].item(), rel=1e-6)


def test_multi_label_cost_uses_only_the_first_k_logits():
    outputs, targets = _emotic_like_batch()
    matcher = HungarianMatcher(multi_label=True, num_class_logits=3)
    base = matcher.cost_matrix(
        outputs["pred_logits"][0],
        outputs["pred_boxes"][0],
        targets[0]["labels"],
        targets[0]["boxes"],
        targets[0][MULTI_HOT_KEY],
    )
    changed_logits = outputs["pred_logits"][0].detach().clone()
    changed_logits[:, 3] += 10.0  # the subject-ness logit is not part of the class cost
    changed = matcher.cost_matrix(
        changed_logits,
        outputs["pred_boxes"][0],
        targets[0]["labels"],
        targets[0]["boxes"],
        targets[0][MULTI_HOT_KEY],
    )
    torch.testing.assert_close(base, changed)


def test_multi_label_targets_are_validated():
    outputs, targets = _emotic_like_batch()
    criterion = SetCriterion(
        4, HungarianMatcher(multi_label=True, num_class_logits=3), multi_label=True
    )
    missing = [dict(targets[0]), dict(targets[1])]
    del missing[1][MULTI_HOT_KEY]
    with pytest.raises(ValueError, match=r"targets\[1\] has no 'multi_hot_labels'"):
        criterion(outputs, missing)
    wrong = [dict(targets[0]), dict(targets[1])]
    wrong[0][MULTI_HOT_KEY] = wrong[0][MULTI_HOT_KEY][:, :2]
    with pytest.raises(
        ValueError, match=r"targets\[0\]\['multi_hot_labels'\] must have shape \(2, 4\)"
    ):
        criterion(outputs, wrong)
    with pytest.raises(ValueError, match="num_class_logits"):
        SetCriterion(4, HungarianMatcher(), num_class_logits=5)
