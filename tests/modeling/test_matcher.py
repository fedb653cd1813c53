import itertools
import math

import pytest
import torch

from deformable_family.modeling.matcher import HungarianMatcher, focal_class_cost


def make_target(labels, boxes):
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


def as_pairs(match):
    query_idx, target_idx = match
    return sorted(zip(query_idx.tolist(), target_idx.tolist()))


def test_focal_class_cost_by_hand():
    # logit 0: p = 0.5. pos = 0.25 * 0.25 * log 2, neg = 0.75 * 0.25 * log 2 (1e-8 is negligible).
    cost = focal_class_cost(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([2]), 0.25, 2.0)
    assert cost.shape == (1, 1)
    assert cost.item() == pytest.approx((0.0625 - 0.1875) * math.log(2), rel=1e-6)


def test_focal_class_cost_takes_the_target_class():
    logits = torch.tensor([[4.0, -4.0]])
    cost = focal_class_cost(logits, torch.tensor([0, 1]), 0.25, 2.0)
    # A confident correct class is cheaper than a confident wrong one.
    assert cost[0, 0] < 0 < cost[0, 1]


def test_obvious_assignment():
    outputs = {
        "pred_logits": torch.zeros(1, 2, 2),
        "pred_boxes": torch.tensor([[[0.8, 0.8, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]]),
    }
    targets = [make_target([0, 1], [[0.2, 0.2, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])]
    (match,) = HungarianMatcher()(outputs, targets)
    assert as_pairs(match) == [(0, 1), (1, 0)]
    assert match[0].dtype == match[1].dtype == torch.int64


def test_cost_weights_flip_the_assignment():
    # Query 0 says class 0 but sits on the class-1 target; query 1 the other way round.
    outputs = {
        "pred_logits": torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]]),
        "pred_boxes": torch.tensor([[[0.8, 0.8, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]]),
    }
    targets = [make_target([0, 1], [[0.2, 0.2, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])]
    by_class = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)(outputs, targets)
    by_box = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=1.0)(outputs, targets)
    assert as_pairs(by_class[0]) == [(0, 0), (1, 1)]
    assert as_pairs(by_box[0]) == [(0, 1), (1, 0)]


def test_empty_targets_and_different_counts_in_a_batch():
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(3, 4, 3, generator=generator),
        "pred_boxes": torch.rand(3, 4, 4, generator=generator) * 0.4 + 0.1,
    }
    targets = [
        make_target([0, 2, 1], [[0.3, 0.3, 0.1, 0.2], [0.6, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]]),
        make_target([], []),
        make_target([1], [[0.4, 0.6, 0.2, 0.3]]),
    ]
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == 3
    assert [len(query_idx) for query_idx, _ in indices] == [3, 0, 1]
    for (query_idx, target_idx), target in zip(indices, targets):
        assert query_idx.dtype == target_idx.dtype == torch.int64
        assert len(set(query_idx.tolist())) == len(query_idx)  # one-to-one
        assert sorted(target_idx.tolist()) == list(range(len(target["labels"])))
        assert query_idx.tolist() == sorted(query_idx.tolist())


def test_more_targets_than_queries():
    outputs = {"pred_logits": torch.zeros(1, 2, 1), "pred_boxes": torch.full((1, 2, 4), 0.3)}
    targets = [make_target([0, 0, 0], [[0.3, 0.3, 0.3, 0.3]] * 3)]
    ((query_idx, target_idx),) = HungarianMatcher()(outputs, targets)
    assert sorted(query_idx.tolist()) == [0, 1]
    assert len(set(target_idx.tolist())) == 2


def reference_cost(logits, pred_boxes, labels, target_boxes, weights, alpha=0.25, gamma=2.0):
    """The matching cost written out pair by pair in plain Python, from the formulas."""

    def to_xyxy(box):
        cx, cy, w, h = box
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    def giou(box1, box2):
        a, b = to_xyxy(box1), to_xyxy(box2)
        inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        intersection = inter_w * inter_h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
        enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        return intersection / union - (enclosing - union) / enclosing

    cost_class, cost_bbox, cost_giou = weights
    rows = []
    for query in range(len(logits)):
        row = []
        for target in range(len(labels)):
            p = 1 / (1 + math.exp(-logits[query][labels[target]]))
            positive = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
            negative = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
            l1 = sum(abs(x - y) for x, y in zip(pred_boxes[query], target_boxes[target]))
            row.append(
                cost_class * (positive - negative)
                + cost_bbox * l1
                - cost_giou * giou(pred_boxes[query], target_boxes[target])
            )
        rows.append(row)
    return rows


@pytest.mark.parametrize("weights", [(2.0, 5.0, 2.0), (1.0, 0.0, 3.0)])
def test_matches_brute_force_on_random_case(weights):
    generator = torch.Generator().manual_seed(3)
    num_queries, num_targets, num_classes = 5, 3, 4
    logits = torch.randn(1, num_queries, num_classes, generator=generator, dtype=torch.float64)
    pred_boxes = torch.rand(1, num_queries, 4, generator=generator, dtype=torch.float64) * 0.4 + 0.1
    labels = torch.randint(num_classes, (num_targets,), generator=generator)
    target_boxes = torch.rand(num_targets, 4, generator=generator, dtype=torch.float64) * 0.4 + 0.1
    matcher = HungarianMatcher(*weights)
    ((query_idx, target_idx),) = matcher(
        {"pred_logits": logits, "pred_boxes": pred_boxes},
        [{"labels": labels, "boxes": target_boxes}],
    )

    cost = reference_cost(
        logits[0].tolist(), pred_boxes[0].tolist(), labels.tolist(), target_boxes.tolist(), weights
    )
    computed_cost = matcher.cost_matrix(logits[0], pred_boxes[0], labels, target_boxes)
    torch.testing.assert_close(
        computed_cost, torch.tensor(cost, dtype=torch.float32), rtol=1e-5, atol=1e-5
    )
    matched_total = sum(cost[q][t] for q, t in zip(query_idx.tolist(), target_idx.tolist()))
    best_total = min(
        sum(cost[query][target] for target, query in enumerate(queries))
        for queries in itertools.permutations(range(num_queries), num_targets)
    )
    assert len(query_idx) == num_targets
    # The matcher solves in float32: equal to the exhaustive optimum up to float32 rounding.
    assert matched_total == pytest.approx(best_total, abs=1e-4)


def test_cost_weights_validated():
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=0.0)
    with pytest.raises(ValueError, match="cost_bbox"):
        HungarianMatcher(cost_bbox=-1.0)


def test_nan_prediction_names_the_image():
    pred_boxes = torch.full((2, 3, 4), 0.3)
    pred_boxes[1, 2, 0] = float("nan")
    outputs = {"pred_logits": torch.zeros(2, 3, 2), "pred_boxes": pred_boxes}
    targets = [make_target([0], [[0.3, 0.3, 0.3, 0.3]])] * 2
    with pytest.raises(ValueError, match=r"pred_boxes'\]\[1\]"):
        HungarianMatcher()(outputs, targets)


def test_invalid_targets_are_named():
    outputs = {"pred_logits": torch.zeros(2, 3, 2), "pred_boxes": torch.full((2, 3, 4), 0.3)}
    good = make_target([0], [[0.3, 0.3, 0.3, 0.3]])
    with pytest.raises(ValueError, match=r"targets\[1\].*label 2"):
        HungarianMatcher()(outputs, [good, make_target([2], [[0.3, 0.3, 0.3, 0.3]])])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        HungarianMatcher()(
            outputs, [{"labels": torch.tensor([0]), "boxes": torch.zeros(1, 3)}, good]
        )
    with pytest.raises(ValueError, match="batch size 2"):
        HungarianMatcher()(outputs, [good])


def test_half_precision_predictions():
    outputs = {
        "pred_logits": torch.zeros(1, 2, 2, dtype=torch.bfloat16),
        "pred_boxes": torch.tensor(
            [[[0.8, 0.8, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]]], dtype=torch.bfloat16
        ),
    }
    targets = [make_target([0, 1], [[0.2, 0.2, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]])]
    (match,) = HungarianMatcher()(outputs, targets)
    assert as_pairs(match) == [(0, 1), (1, 0)]


def test_target_values_are_checked_with_one_host_sync(monkeypatch):
    """check_targets reads the values of the whole batch back once (one sync on a GPU), not once
    per image and field."""
    from deformable_family.modeling.matcher import check_targets

    targets = [make_target([0, 1], [[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]]) for _ in range(4)]
    reads = []
    to_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or to_bool(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or 0)
    checked = check_targets(targets, 4, 2)
    monkeypatch.undo()
    assert len(reads) == 1
    assert list(checked) == targets
