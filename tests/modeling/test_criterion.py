import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deformable_family.modeling.criterion import SetCriterion, compute_num_boxes
from deformable_family.modeling.losses import giou_box_loss, l1_box_loss, sigmoid_focal_loss
from deformable_family.modeling.matcher import HungarianMatcher

BASE_KEYS = {"loss_class", "loss_bbox", "loss_giou"}
UNIT_WEIGHTS = {"loss_class": 1.0, "loss_bbox": 1.0, "loss_giou": 1.0}


class FixedMatcher(nn.Module):
    """Returns the given indices for every output set and records the targets it was called with."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices
        self.calls = []

    def forward(self, outputs, targets):
        self.calls.append((outputs, targets))
        return [(torch.tensor(q), torch.tensor(t)) for q, t in self.indices]


def focal_element(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def random_outputs(generator, batch_size=2, num_queries=5, num_classes=3, requires_grad=False):
    logits = torch.randn(batch_size, num_queries, num_classes, generator=generator)
    box_logits = torch.randn(batch_size, num_queries, 4, generator=generator)
    logits.requires_grad_(requires_grad)
    box_logits.requires_grad_(requires_grad)
    # Widths and heights below 0.5 keep the boxes mostly inside the image, like real predictions.
    boxes = torch.sigmoid(box_logits) * torch.tensor([1.0, 1.0, 0.5, 0.5])
    return {"pred_logits": logits, "pred_boxes": boxes}, logits, box_logits


def make_targets():
    return [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


def test_losses_by_hand_with_fixed_matching():
    logits = [[1.0, -1.0], [0.0, 2.0]]
    outputs = {
        "pred_logits": torch.tensor([logits], dtype=torch.float64),
        "pred_boxes": torch.tensor(
            [[[0.5, 0.5, 0.3, 0.2], [0.1, 0.1, 0.1, 0.1]]], dtype=torch.float64
        ),
    }
    targets = [
        {
            "labels": torch.tensor([1]),
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64),
        }
    ]
    # Query 0 matched to the only target (class 1): target one-hot [[0, 1], [0, 0]].
    criterion = SetCriterion(2, FixedMatcher([([0], [0])]))
    losses = criterion(outputs, targets)

    onehot = [[0, 1], [0, 0]]
    focal_sum = sum(focal_element(logits[q][c], onehot[q][c]) for q in range(2) for c in range(2))
    # The focal loss is summed over queries and classes and divided by num_boxes = 1.
    assert losses["loss_class"].item() == pytest.approx(2.0 * focal_sum)
    # L1: only the width differs, by 0.1.
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.1)
    # Target xyxy [0.4, 0.4, 0.6, 0.6] lies inside the prediction [0.35, 0.4, 0.65, 0.6]:
    # IoU = 0.04 / 0.06 and the enclosing box is the prediction, so GIoU = 2/3.
    assert losses["loss_giou"].item() == pytest.approx(2.0 * (1 - 2 / 3))


def test_keys_with_aux_and_enc_outputs():
    generator = torch.Generator().manual_seed(0)
    outputs, _, _ = random_outputs(generator)
    outputs["aux_outputs"] = [random_outputs(generator)[0] for _ in range(3)]
    outputs["enc_outputs"] = random_outputs(generator, num_queries=6, num_classes=1)[0]
    losses = SetCriterion(3, HungarianMatcher())(outputs, make_targets())
    expected = set(BASE_KEYS)
    for suffix in ["_0", "_1", "_2", "_enc"]:
        expected |= {key + suffix for key in BASE_KEYS}
    assert set(losses) == expected
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())


def test_number_of_aux_losses_follows_the_outputs():
    generator = torch.Generator().manual_seed(1)
    criterion = SetCriterion(3, HungarianMatcher())
    for num_aux in (0, 5):
        outputs, _, _ = random_outputs(generator)
        outputs["aux_outputs"] = [random_outputs(generator)[0] for _ in range(num_aux)]
        losses = criterion(outputs, make_targets())
        assert len(losses) == 3 * (1 + num_aux)
        assert {f"loss_giou_{i}" for i in range(num_aux)} <= set(losses)


def test_weights_applied_and_losses_match_the_loss_functions():
    generator = torch.Generator().manual_seed(2)
    outputs, _, _ = random_outputs(generator)
    outputs["aux_outputs"] = [random_outputs(generator)[0]]
    targets = make_targets()
    matcher = HungarianMatcher()
    weights = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}
    weighted = SetCriterion(3, matcher, weight_dict=weights)(outputs, targets)
    unweighted = SetCriterion(3, matcher, weight_dict=UNIT_WEIGHTS)(outputs, targets)
    for key, loss in weighted.items():
        base = key if key in BASE_KEYS else key.rsplit("_", 1)[0]
        torch.testing.assert_close(loss, weights[base] * unweighted[key])

    # The unweighted final losses, recomputed from the loss functions on the matcher's assignment.
    indices = matcher(outputs, targets)
    num_boxes = 3.0
    onehot = torch.zeros_like(outputs["pred_logits"])
    src_boxes, target_boxes = [], []
    for image_index, ((query_idx, target_idx), target) in enumerate(zip(indices, targets)):
        onehot[image_index, query_idx, target["labels"][target_idx]] = 1
        src_boxes.append(outputs["pred_boxes"][image_index, query_idx])
        target_boxes.append(target["boxes"][target_idx])
    src_boxes, target_boxes = torch.cat(src_boxes), torch.cat(target_boxes)
    num_queries = outputs["pred_logits"].shape[1]
    expected_class = num_queries * sigmoid_focal_loss(outputs["pred_logits"], onehot, num_boxes)
    torch.testing.assert_close(unweighted["loss_class"], expected_class)
    torch.testing.assert_close(
        unweighted["loss_bbox"], l1_box_loss(src_boxes, target_boxes, num_boxes)
    )
    torch.testing.assert_close(
        unweighted["loss_giou"], giou_box_loss(src_boxes, target_boxes, num_boxes)
    )


def test_each_output_set_is_matched_and_enc_targets_are_binary():
    generator = torch.Generator().manual_seed(3)
    outputs, _, _ = random_outputs(generator)
    outputs["aux_outputs"] = [random_outputs(generator)[0] for _ in range(2)]
    enc_logits = torch.randn(2, 4, 1, generator=generator, dtype=torch.float64)
    outputs["enc_outputs"] = {
        "pred_logits": enc_logits,
        "pred_boxes": torch.full((2, 4, 4), 0.3, dtype=torch.float64),
    }
    matcher = FixedMatcher([([3, 1], [0, 1]), ([2], [0])])
    losses = SetCriterion(3, matcher, weight_dict=UNIT_WEIGHTS)(outputs, make_targets())

    assert len(matcher.calls) == 1 + 2 + 1
    enc_call_outputs, enc_call_targets = matcher.calls[-1]
    assert enc_call_outputs is outputs["enc_outputs"]
    assert [target["labels"].tolist() for target in enc_call_targets] == [[0, 0], [0]]
    # Binary targets: 1 at (image 0, queries 3 and 1) and (image 1, query 2), class 0.
    onehot = torch.zeros_like(enc_logits)
    onehot[0, [3, 1], 0] = 1
    onehot[1, 2, 0] = 1
    expected = 4 * sigmoid_focal_loss(enc_logits, onehot, 3.0)
    torch.testing.assert_close(losses["loss_class_enc"], expected)


def test_enc_outputs_with_all_class_logits_positive_in_column_0():
    generator = torch.Generator().manual_seed(4)
    outputs, _, _ = random_outputs(generator)
    enc_logits = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    outputs["enc_outputs"] = {
        "pred_logits": enc_logits,
        "pred_boxes": torch.full((2, 4, 4), 0.3, dtype=torch.float64),
    }
    losses = SetCriterion(3, FixedMatcher([([0, 1], [0, 1]), ([2], [0])]), UNIT_WEIGHTS)(
        outputs, make_targets()
    )
    onehot = torch.zeros_like(enc_logits)
    onehot[0, [0, 1], 0] = 1
    onehot[1, 2, 0] = 1
    torch.testing.assert_close(
        losses["loss_class_enc"], 4 * sigmoid_focal_loss(enc_logits, onehot, 3.0)
    )


def test_gradient_flows_to_logits_and_boxes():
    generator = torch.Generator().manual_seed(5)
    outputs, logits, box_logits = random_outputs(generator, requires_grad=True)
    losses = SetCriterion(3, HungarianMatcher())(outputs, make_targets())
    sum(losses.values()).backward()
    for grad in (logits.grad, box_logits.grad):
        assert grad is not None and bool(torch.isfinite(grad).all())
        assert grad.abs().sum() > 0


def test_zero_target_images():
    generator = torch.Generator().manual_seed(6)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    criterion = SetCriterion(3, HungarianMatcher())

    outputs, _, _ = random_outputs(generator)
    mixed = criterion(outputs, [make_targets()[0], empty])
    assert all(torch.isfinite(loss) for loss in mixed.values())

    outputs = {"pred_logits": torch.zeros(1, 2, 2), "pred_boxes": torch.full((1, 2, 4), 0.3)}
    outputs["pred_boxes"].requires_grad_(True)
    losses = SetCriterion(2, HungarianMatcher())(outputs, [empty])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    # Every element is a negative at logit 0; num_boxes is clamped to 1; weight 2.
    assert losses["loss_class"].item() == pytest.approx(2.0 * 4 * focal_element(0.0, 0))
    sum(losses.values()).backward()
    # The box losses stay in the graph (no error, a gradient reaches the boxes) and, with nothing
    # matched, push no box anywhere.
    assert outputs["pred_boxes"].grad is not None
    assert torch.all(outputs["pred_boxes"].grad == 0)


def test_num_boxes_without_distributed():
    targets = make_targets()
    assert compute_num_boxes(targets, "cpu") == 3.0
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    assert compute_num_boxes([empty, empty], "cpu") == 1.0


# Per case, the target counts of each image on each of the 2 workers, and the expected num_boxes.
DISTRIBUTED_CASES = [
    ([[2, 1], [0, 0]], 1.5),  # (3 + 0) / 2 workers
    ([[1, 0], [0, 0]], 1.0),  # (1 + 0) / 2 = 0.5, clamped to 1
]


def _distributed_worker(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = []
        for counts_per_rank, _ in DISTRIBUTED_CASES:
            counts = counts_per_rank[rank]
            targets = [
                {
                    "labels": torch.zeros(count, dtype=torch.int64),
                    "boxes": torch.full((count, 4), 0.25),
                }
                for count in counts
            ]
            # Every predicted coordinate is 0.1 from every target coordinate: L1 0.4 per
            # matched box.
            outputs = {
                "pred_logits": torch.zeros(len(counts), 2, 1),
                "pred_boxes": torch.full((len(counts), 2, 4), 0.35),
            }
            losses = SetCriterion(1, HungarianMatcher(), UNIT_WEIGHTS)(outputs, targets)
            results.append((compute_num_boxes(targets, "cpu"), losses["loss_bbox"].item()))
        torch.save(results, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_over_workers(tmp_path):
    # spawn, not fork: a child forked from a process whose OpenMP pool is running can deadlock in
    # its first parallel op (seen here: CI hung inside binary_cross_entropy_with_logits).
    mp.start_processes(
        _distributed_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    for rank in range(2):
        results = torch.load(tmp_path / f"{rank}.pt")
        for (counts_per_rank, expected), (num_boxes, loss_bbox) in zip(DISTRIBUTED_CASES, results):
            assert num_boxes == pytest.approx(expected)
            # The criterion divides the local L1 sum by the averaged num_boxes, not the local count.
            local_count = sum(counts_per_rank[rank])
            assert loss_bbox == pytest.approx(0.4 * local_count / expected)


def test_invalid_targets_and_outputs():
    generator = torch.Generator().manual_seed(7)
    outputs, _, _ = random_outputs(generator)
    criterion = SetCriterion(3, HungarianMatcher())
    bad_label = make_targets()
    bad_label[1]["labels"] = torch.tensor([3])
    with pytest.raises(ValueError, match=r"targets\[1\].*label 3"):
        criterion(outputs, bad_label)
    bad_boxes = make_targets()
    bad_boxes[0]["boxes"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\].*\(n, 4\)"):
        criterion(outputs, bad_boxes)
    with pytest.raises(ValueError, match=r"pred_logits.*\(B, Q, 4\)"):
        SetCriterion(4, HungarianMatcher())(outputs, make_targets())
    outputs["aux_outputs"] = [{"pred_logits": outputs["pred_logits"]}]
    with pytest.raises(ValueError, match=r"aux_outputs'\]\[0\] has no 'pred_boxes'"):
        criterion(outputs, make_targets())


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0, HungarianMatcher())
    with pytest.raises(ValueError, match="loss_ce"):
        SetCriterion(3, HungarianMatcher(), weight_dict={**UNIT_WEIGHTS, "loss_ce": 1.0})
    with pytest.raises(ValueError, match="loss_giou"):
        SetCriterion(3, HungarianMatcher(), weight_dict={"loss_class": 1.0, "loss_bbox": 1.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_criterion_on_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(8)
    outputs, _, _ = random_outputs(generator)
    outputs["aux_outputs"] = [random_outputs(generator)[0]]
    criterion = SetCriterion(3, HungarianMatcher())
    cpu_losses = criterion(outputs, make_targets())
    cuda_outputs = {
        "pred_logits": outputs["pred_logits"].cuda(),
        "pred_boxes": outputs["pred_boxes"].cuda(),
        "aux_outputs": [{key: value.cuda() for key, value in outputs["aux_outputs"][0].items()}],
    }
    cuda_targets = [
        {key: value.cuda() for key, value in target.items()} for target in make_targets()
    ]
    cuda_losses = criterion(cuda_outputs, cuda_targets)
    for key, loss in cpu_losses.items():
        assert cuda_losses[key].device.type == "cuda"
        torch.testing.assert_close(cuda_losses[key].cpu(), loss, rtol=1e-4, atol=1e-5)


def test_targets_are_validated_once_per_call(monkeypatch):
    """Validated where they enter (the criterion), not again by the matcher for each output set."""
    from deformable_family.modeling import criterion as criterion_module
    from deformable_family.modeling import matcher as matcher_module

    calls = []
    check_targets = matcher_module.check_targets

    def counting_check_targets(*args, **kwargs):
        calls.append(args[1:])
        return check_targets(*args, **kwargs)

    monkeypatch.setattr(matcher_module, "check_targets", counting_check_targets)
    monkeypatch.setattr(criterion_module, "check_targets", counting_check_targets)
    generator = torch.Generator().manual_seed(9)
    outputs, _, _ = random_outputs(generator)
    outputs["aux_outputs"] = [random_outputs(generator)[0] for _ in range(3)]
    outputs["enc_outputs"] = random_outputs(generator, num_queries=6, num_classes=1)[0]
    losses = SetCriterion(3, HungarianMatcher())(outputs, make_targets())
    assert len(losses) == 3 * 5
    assert calls == [(2, 3)]
    # The matcher alone still validates what it is given.
    HungarianMatcher()(outputs, make_targets())
    assert calls == [(2, 3), (2, 3)]
