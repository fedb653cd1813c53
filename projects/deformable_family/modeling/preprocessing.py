"""Input normalisation, padding and training targets of the set-prediction detectors.

Written once for the query-based detectors added after Deformable DETR (AdaMixer, StageInteractor);
``DeformableDETR.preprocess_image`` / ``prepare_targets`` behave the same (size_divisibility 0).
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.structures import ImageList
from torch import Tensor

from .box_ops import box_xyxy_to_cxcywh

__all__ = ["normalize_and_pad", "normalized_targets"]


def normalize_and_pad(
    batched_inputs: Sequence[Dict],
    pixel_mean: Tensor,
    pixel_std: Tensor,
    input_format: str,
    size_divisibility: int = 0,
) -> Tuple[ImageList, Tensor]:
    """Normalise each image, turn it to RGB, pad the batch with zeros to a common size.

    Args:
        batched_inputs: detectron2 inputs, each with "image" (3, H, W) in ``input_format``.
        pixel_mean, pixel_std: (3, 1, 1) in ``input_format`` order, 0-255 scale, on the model's
            device.
        input_format: "RGB" or "BGR".
        size_divisibility: pad height and width up to a multiple of it (0: to the largest image).

    Returns:
        images: ImageList (B, 3, H_pad, W_pad) RGB with the unpadded ``image_sizes``;
        mask: (B, H_pad, W_pad) bool, True on padding.
    """
    images = []
    for index, item in enumerate(batched_inputs):
        if "image" not in item:
            raise ValueError(f"batched_inputs[{index}] has no 'image' field")
        image = item["image"]
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"batched_inputs[{index}]['image'] must be a (3, H, W) tensor, got "
                f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
            )
        image = (image.to(pixel_mean.device, torch.float32) - pixel_mean) / pixel_std
        if input_format == "BGR":
            image = image.flip(0)
        images.append(image)
    images = ImageList.from_tensors(images, size_divisibility=size_divisibility)
    mask = torch.ones(
        images.tensor.shape[0],
        *images.tensor.shape[-2:],
        dtype=torch.bool,
        device=pixel_mean.device,
    )
    for index, (height, width) in enumerate(images.image_sizes):
        mask[index, :height, :width] = False
    return images, mask


def normalized_targets(
    batched_inputs: Sequence[Dict], image_sizes: Sequence[Tuple[int, int]], device: torch.device
) -> List[Dict[str, Tensor]]:
    """gt_boxes (xyxy absolute) -> {"labels": (n,) int64, "boxes": (n, 4) cxcywh normalised by the
    unpadded image size}, the criterion's target format."""
    targets = []
    for index, (item, (height, width)) in enumerate(zip(batched_inputs, image_sizes)):
        if "instances" not in item:
            raise ValueError(f"batched_inputs[{index}] has no 'instances' field in training")
        instances = item["instances"].to(device)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
        boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float() / scale)
        targets.append({"labels": instances.gt_classes.long(), "boxes": boxes})
    return targets
