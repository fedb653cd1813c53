import math

import pytest
import torch

from deformable_family.modeling.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    inverse_sigmoid,
)


def random_xyxy(num_boxes: int, generator: torch.Generator) -> torch.Tensor:
    top_left = torch.rand(num_boxes, 2, generator=generator, dtype=torch.float64)
    size = torch.rand(num_boxes, 2, generator=generator, dtype=torch.float64) * 0.5 + 0.01
    return torch.cat([top_left, top_left + size], dim=1)


def test_format_conversion_by_hand():
    cxcywh = torch.tensor([0.5, 0.5, 0.2, 0.4])
    # x0 = 0.5 - 0.1, y0 = 0.5 - 0.2, x1 = 0.5 + 0.1, y1 = 0.5 + 0.2
    expected_xyxy = torch.tensor([0.4, 0.3, 0.6, 0.7])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), expected_xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(expected_xyxy), cxcywh)


def test_format_round_trip_keeps_leading_dims():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(2, 3, 4, generator=generator, dtype=torch.float64)
    converted = box_cxcywh_to_xyxy(boxes)
    assert converted.shape == (2, 3, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(converted), boxes)


def test_last_dim_must_be_four():
    with pytest.raises(ValueError, match="boxes"):
        box_cxcywh_to_xyxy(torch.zeros(3, 5))


def test_box_area_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.5, 2.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 0.5]))


def test_box_iou_by_hand():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    boxes2 = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    iou, union = box_iou(boxes1, boxes2)
    assert iou.shape == union.shape == (1, 3)
    # Overlap [1, 2] x [1, 2] = 1, union 4 + 4 - 1 = 7; identical boxes; disjoint boxes
    # (union 4 + 1).
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0]]))


def test_generalized_box_iou_by_hand():
    boxes1 = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    boxes2 = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    giou = generalized_box_iou(boxes1, boxes2)
    assert giou.shape == (2, 2)
    # Overlapping pair: IoU 1/7, enclosing box [0, 3] x [0, 3] of area 9, union 7.
    assert giou[0, 0].item() == pytest.approx(1 / 7 - (9 - 7) / 9)
    # Disjoint unit squares one apart: IoU 0, enclosing [0, 3] x [0, 1] of area 3, union 2.
    assert giou[1, 1].item() == pytest.approx(-(3 - 2) / 3)


def test_generalized_box_iou_invariants():
    generator = torch.Generator().manual_seed(1)
    boxes1, boxes2 = random_xyxy(5, generator), random_xyxy(7, generator)
    giou = generalized_box_iou(boxes1, boxes2)
    iou, _ = box_iou(boxes1, boxes2)
    assert giou.shape == (5, 7)
    assert bool((giou <= iou + 1e-12).all())
    assert bool((giou >= -1).all()) and bool((giou <= 1).all())
    torch.testing.assert_close(generalized_box_iou(boxes2, boxes1), giou.T)
    torch.testing.assert_close(
        torch.diagonal(generalized_box_iou(boxes1, boxes1)), torch.ones(5, dtype=torch.float64)
    )


def test_generalized_box_iou_names_the_degenerate_argument():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    reversed_box = torch.tensor([[0.5, 0.0, 0.4, 1.0]])
    nan_box = torch.tensor([[0.0, float("nan"), 1.0, 1.0]])
    with pytest.raises(ValueError, match="boxes2"):
        generalized_box_iou(good, reversed_box)
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(nan_box, good)
    with pytest.raises(ValueError, match="boxes1"):
        elementwise_generalized_box_iou(reversed_box, good)


def test_zero_size_box_is_allowed():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    unit = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # Point inside the unit square: IoU 0, union 1, enclosing box = unit square, so GIoU 0.
    assert generalized_box_iou(point, unit).item() == pytest.approx(0.0)


def test_elementwise_matches_pairwise_diagonal():
    generator = torch.Generator().manual_seed(2)
    boxes1, boxes2 = random_xyxy(6, generator), random_xyxy(6, generator)
    torch.testing.assert_close(
        elementwise_box_iou(boxes1, boxes2), torch.diagonal(box_iou(boxes1, boxes2)[0])
    )
    torch.testing.assert_close(
        elementwise_generalized_box_iou(boxes1, boxes2),
        torch.diagonal(generalized_box_iou(boxes1, boxes2)),
    )


def test_elementwise_requires_same_shape():
    with pytest.raises(ValueError, match="same shape"):
        elementwise_box_iou(torch.zeros(2, 4), torch.zeros(3, 4))


def test_elementwise_empty():
    empty = torch.zeros(0, 4)
    assert elementwise_generalized_box_iou(empty, empty).shape == (0,)


def test_inverse_sigmoid_inverts_sigmoid():
    x = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(inverse_sigmoid(x)), x)
    assert inverse_sigmoid(x)[1].item() == pytest.approx(0.0)


def test_inverse_sigmoid_clamps():
    x = torch.tensor([0.0, 1.0, 1.5, -0.5], dtype=torch.float64)
    result = inverse_sigmoid(x, eps=1e-3)
    # 0 -> log(eps / 1), 1 -> log(1 / eps); outside [0, 1] first clamped to [0, 1].
    expected = [math.log(1e-3), -math.log(1e-3), -math.log(1e-3), math.log(1e-3)]
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64))
