import math

import pytest
import torch
import torch.nn.functional as F

from deformable_family.modeling.losses import giou_box_loss, l1_box_loss, sigmoid_focal_loss


def single(value: float) -> torch.Tensor:
    return torch.tensor([[[value]]], dtype=torch.float64)  # (B=1, Q=1, C=1)


def test_focal_loss_single_logit_by_hand():
    # logit 0: p = 0.5. Positive: alpha * (1 - p)^2 * -log(p) = 0.25 * 0.25 * log 2.
    assert sigmoid_focal_loss(single(0.0), single(1.0), 1).item() == pytest.approx(
        0.25 * 0.25 * math.log(2)
    )
    # Negative: (1 - alpha) * p^2 * -log(1 - p) = 0.75 * 0.25 * log 2.
    assert sigmoid_focal_loss(single(0.0), single(0.0), 1).item() == pytest.approx(
        0.75 * 0.25 * math.log(2)
    )
    # logit log 3: p = 0.75. Positive: 0.25 * 0.25^2 * -log 0.75;
    # negative: 0.75 * 0.75^2 * -log 0.25.
    logit = math.log(3)
    assert sigmoid_focal_loss(single(logit), single(1.0), 1).item() == pytest.approx(
        0.25 * 0.0625 * -math.log(0.75)
    )
    assert sigmoid_focal_loss(single(logit), single(0.0), 1).item() == pytest.approx(
        0.75 * 0.5625 * -math.log(0.25)
    )


def test_focal_loss_parameters():
    # gamma 1, alpha 0.5, logit 0, positive: 0.5 * 0.5 * log 2.
    assert sigmoid_focal_loss(
        single(0.0), single(1.0), 1, alpha=0.5, gamma=1.0
    ).item() == pytest.approx(0.25 * math.log(2))
    # A negative alpha drops the alpha_t factor: (1 - p)^2 * log 2.
    assert sigmoid_focal_loss(single(0.0), single(1.0), 1, alpha=-1).item() == pytest.approx(
        0.25 * math.log(2)
    )


def test_focal_loss_without_focusing_is_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    targets = (torch.rand(2, 3, 4, generator=generator) > 0.5).double()
    expected = (
        F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / 5
    )
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, 5, alpha=-1, gamma=0.0), expected
    )


def test_focal_loss_reduction_is_mean_over_queries_sum_over_rest():
    # Every element is a negative at logit 0, so every element loses e = 0.75 * 0.25 * log 2.
    element = 0.75 * 0.25 * math.log(2)
    logits = torch.zeros(2, 3, 1, dtype=torch.float64)  # B = 2, Q = 3, C = 1
    loss = sigmoid_focal_loss(logits, torch.zeros_like(logits), num_boxes=4)
    # Mean over the 3 queries gives e per (image, class); summed over 2 images; divided by 4.
    assert loss.item() == pytest.approx(2 * element / 4)


def test_focal_loss_accepts_tensor_num_boxes():
    loss = sigmoid_focal_loss(single(0.0), single(1.0), torch.tensor(2.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(0.25 * 0.25 * math.log(2) / 2)


def test_focal_loss_shape_mismatch():
    with pytest.raises(ValueError, match="logits and targets"):
        sigmoid_focal_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), 1)


def test_l1_loss_by_hand():
    src = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    target = torch.tensor([[0.6, 0.4, 0.2, 0.3]], dtype=torch.float64)
    # |0.5 - 0.6| + |0.5 - 0.4| + 0 + |0.2 - 0.3| = 0.3, over 2 boxes.
    assert l1_box_loss(src, target, 2).item() == pytest.approx(0.15)


def test_giou_loss_by_hand():
    src = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([[0.5, 0.5, 1.0, 1.0], [2.5, 0.5, 1.0, 1.0]], dtype=torch.float64)
    # Identical boxes: 1 - 1 = 0. xyxy [0,0,1,1] vs [2,0,3,1]: GIoU = 0 - (3 - 2) / 3, loss 4/3.
    assert giou_box_loss(src, target, 3).item() == pytest.approx((0 + 4 / 3) / 3)


def test_giou_loss_names_degenerate_argument():
    good = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    negative_width = torch.tensor([[0.5, 0.5, -0.2, 0.2]])
    with pytest.raises(ValueError, match="src_boxes"):
        giou_box_loss(negative_width, good, 1)
    with pytest.raises(ValueError, match="target_boxes"):
        giou_box_loss(good, negative_width, 1)


def test_box_losses_with_no_boxes_are_zero_and_keep_the_graph():
    src = torch.zeros(0, 4, requires_grad=True)
    target = torch.zeros(0, 4)
    total = l1_box_loss(src, target, 1) + giou_box_loss(src, target, 1)
    assert total.item() == 0.0
    total.backward()
    assert src.grad is not None and src.grad.shape == (0, 4)
