"""From set predictions to detectron2 ``Instances``, shared by the detectors of the family.

Two steps, as in detectron2's meta-architectures: ``detr_inference`` turns the raw predictions into
boxes in the pixels of the network input (the resized, unpadded image), then
``postprocess_to_original`` rescales them to the original image size with detectron2's
``detector_postprocess`` and wraps them as ``[{"instances": Instances}]``.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy

__all__ = ["detr_inference", "postprocess_to_original"]


def detr_inference(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    num_topk: int = 100,
) -> List[Instances]:
    """
    Top-k detections per image over all (query, class) pairs, scored by sigmoid probability, as in
    Deformable DETR: a query may give several detections of different classes.

    Args:
        pred_logits: (B, Q, C) class logits.
        pred_boxes: (B, Q, 4) normalised cxcywh, relative to the unpadded input image.
        image_sizes: B pairs (height, width) of the unpadded input images, in pixels.
        num_topk: detections kept per image; k = min(num_topk, Q * C).

    Returns:
        B ``Instances`` of image size ``image_sizes[b]`` with k detections sorted by decreasing
        score:
        ``pred_boxes`` (Boxes, (k, 4) xyxy absolute pixels clipped to the image), ``scores`` (k,),
        ``pred_classes`` (k,) int64.
    """
    if pred_logits.dim() != 3:
        raise ValueError(f"pred_logits must have shape (B, Q, C), got {tuple(pred_logits.shape)}")
    batch_size, num_queries, num_classes = pred_logits.shape
    if pred_boxes.shape != (batch_size, num_queries, 4):
        raise ValueError(
            f"pred_boxes must have shape (B, Q, 4) = {(batch_size, num_queries, 4)}, "
            f"got {tuple(pred_boxes.shape)}"
        )
    if len(image_sizes) != batch_size:
        raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {batch_size}")
    if not isinstance(num_topk, int) or isinstance(num_topk, bool) or num_topk < 1:
        raise ValueError(f"num_topk must be a positive int, got {num_topk!r}")

    num_detections = min(num_topk, num_queries * num_classes)
    # Flattened index = query * C + class (row-major over (Q, C)).
    scores, flat_indices = pred_logits.sigmoid().flatten(1).topk(num_detections, dim=1)
    query_indices = torch.div(flat_indices, num_classes, rounding_mode="floor")
    classes = flat_indices % num_classes
    boxes_xyxy = box_cxcywh_to_xyxy(pred_boxes)

    results = []
    for image_index, image_size in enumerate(image_sizes):
        height, width = int(image_size[0]), int(image_size[1])
        boxes = boxes_xyxy[image_index, query_indices[image_index]]
        boxes = boxes * boxes.new_tensor([width, height, width, height])
        instances = Instances((height, width))
        instances.pred_boxes = Boxes(boxes)
        instances.pred_boxes.clip((height, width))
        instances.scores = scores[image_index]
        instances.pred_classes = classes[image_index]
        results.append(instances)
    return results


def postprocess_to_original(
    results: Sequence[Instances],
    batched_inputs: Sequence[Dict],
    image_sizes: Sequence[Tuple[int, int]],
) -> List[Dict[str, Instances]]:
    """
    Rescale each image's detections from the network input size to the size requested by its input
    dict ("height", "width", normally the original image size; the input size when absent), as
    detectron2's ``GeneralizedRCNN`` does.

    ``detector_postprocess`` clips the boxes again and drops those left empty, so an image may end
    with fewer than k detections.

    Args:
        results: B ``Instances`` from ``detr_inference`` (pred_boxes in input pixels).
        batched_inputs: the B input dicts given to the model.
        image_sizes: B pairs (height, width) of the unpadded input images.

    Returns:
        B dicts {"instances": Instances} in detectron2's output format.
    """
    if not (len(results) == len(batched_inputs) == len(image_sizes)):
        raise ValueError(
            "results, batched_inputs and image_sizes must have the same length, got "
            f"{len(results)}, {len(batched_inputs)} and {len(image_sizes)}"
        )
    processed = []
    for instances, input_per_image, image_size in zip(results, batched_inputs, image_sizes):
        height = input_per_image.get("height", image_size[0])
        width = input_per_image.get("width", image_size[1])
        processed.append({"instances": detector_postprocess(instances, height, width)})
    return processed
