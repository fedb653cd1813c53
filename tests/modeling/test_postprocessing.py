import pytest
import torch
from detectron2.structures import Boxes, Instances

from deformable_family.modeling.postprocessing import detr_inference, postprocess_to_original


def test_topk_over_queries_and_classes_by_hand():
    # Sigmoid is monotonic, so the order follows the logits:
    # (q0, c1) = 3, (q1, c0) = 2, (q0, c0) = 0.
    logits = torch.tensor([[[0.0, 3.0], [2.0, -1.0]]])
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]])
    (instances,) = detr_inference(logits, boxes, [(100, 200)], num_topk=3)
    assert len(instances) == 3
    assert instances.pred_classes.tolist() == [1, 0, 0]
    torch.testing.assert_close(instances.scores, torch.sigmoid(torch.tensor([3.0, 2.0, 0.0])))
    # Query 0 is xyxy [0, 0, 0.5, 0.5], query 1 [0.5, 0.5, 1, 1], times (w, h) = (200, 100).
    expected = torch.tensor(
        [[0, 0, 100, 50], [100, 50, 200, 100], [0, 0, 100, 50]], dtype=torch.float32
    )
    torch.testing.assert_close(instances.pred_boxes.tensor, expected)


def test_scores_sorted_and_consistent_with_their_query():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=generator)
    boxes = torch.rand(2, 6, 4, generator=generator) * 0.3 + 0.2
    results = detr_inference(logits, boxes, [(50, 60), (70, 40)], num_topk=5)
    for image_index, instances in enumerate(results):
        scores = instances.scores
        assert bool((scores[:-1] >= scores[1:]).all())
        torch.testing.assert_close(
            scores, logits[image_index].sigmoid().flatten().sort(descending=True).values[:5]
        )
        for score, label in zip(scores, instances.pred_classes):
            # The detection's score is the probability of its class for one of the queries.
            assert bool(torch.isclose(logits[image_index, :, label].sigmoid(), score).any())


def test_instances_fields_and_image_size():
    logits = torch.zeros(1, 2, 3)
    boxes = torch.full((1, 2, 4), 0.5)
    (instances,) = detr_inference(logits, boxes, [(30, 40)])
    assert isinstance(instances, Instances)
    assert instances.image_size == (30, 40)
    assert isinstance(instances.pred_boxes, Boxes)
    assert instances.pred_classes.dtype == torch.int64
    assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes"}


def test_k_larger_than_queries_times_classes():
    (instances,) = detr_inference(torch.zeros(1, 2, 3), torch.full((1, 2, 4), 0.5), [(10, 10)], 100)
    assert len(instances) == 2 * 3


def test_boxes_clipped_to_the_image():
    # cx 0.9, w 0.4 spans x in [0.7, 1.1]; y in [0.4, 0.6]; image w 100, h 50.
    boxes = torch.tensor([[[0.9, 0.5, 0.4, 0.2]]])
    (instances,) = detr_inference(torch.zeros(1, 1, 1), boxes, [(50, 100)])
    torch.testing.assert_close(
        instances.pred_boxes.tensor, torch.tensor([[70.0, 20.0, 100.0, 30.0]])
    )


def test_rescaled_to_the_original_size():
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5, 0.5]]])
    image_sizes = [(100, 200), (100, 200)]
    results = detr_inference(torch.zeros(2, 1, 1), boxes, image_sizes)
    # Image 0 was resized by 1/2 from 200 x 400; image 1 gives no original size: kept as is.
    processed = postprocess_to_original(results, [{"height": 200, "width": 400}, {}], image_sizes)
    assert [list(output) for output in processed] == [["instances"], ["instances"]]
    original, unchanged = processed[0]["instances"], processed[1]["instances"]
    assert original.image_size == (200, 400)
    torch.testing.assert_close(
        original.pred_boxes.tensor, torch.tensor([[100.0, 50.0, 300.0, 150.0]])
    )
    assert unchanged.image_size == (100, 200)
    torch.testing.assert_close(
        unchanged.pred_boxes.tensor, torch.tensor([[50.0, 25.0, 150.0, 75.0]])
    )


def test_invalid_arguments():
    logits, boxes = torch.zeros(1, 2, 3), torch.full((1, 2, 4), 0.5)
    with pytest.raises(ValueError, match="num_topk"):
        detr_inference(logits, boxes, [(10, 10)], num_topk=0)
    with pytest.raises(ValueError, match="image_sizes"):
        detr_inference(logits, boxes, [(10, 10), (10, 10)])
    with pytest.raises(ValueError, match="pred_boxes"):
        detr_inference(logits, torch.zeros(1, 3, 4), [(10, 10)])
    with pytest.raises(ValueError, match="same length"):
        postprocess_to_original(detr_inference(logits, boxes, [(10, 10)]), [], [(10, 10)])


def test_boxes_empty_after_clipping_are_dropped():
    """Query 1 lies wholly right of the image: clipped to zero width, dropped by
    detector_postprocess, so the image ends with fewer detections than top-k."""
    logits = torch.tensor([[[2.0], [3.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [1.5, 0.5, 0.2, 0.2]]])
    results = detr_inference(logits, boxes, [(50, 100)], num_topk=2)
    assert len(results[0]) == 2  # kept (clipped to zero width) until the rescale
    (processed,) = postprocess_to_original(results, [{"height": 100, "width": 200}], [(50, 100)])
    instances = processed["instances"]
    assert len(instances) == 1
    torch.testing.assert_close(instances.pred_boxes.tensor, torch.tensor([[80.0, 40.0, 120.0, 60.0]]))
    torch.testing.assert_close(instances.scores, torch.sigmoid(torch.tensor([2.0])))
