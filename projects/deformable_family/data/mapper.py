"""Dataset mapper of the DETR family: reads an image, augments it, and builds ``Instances``."""
import copy
from collections import abc
import logging
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

__all__ = ["DetrDatasetMapper", "read_image_or_fail"]

logger = logging.getLogger(__name__)


def read_image_or_fail(file_name: str, image_format: str) -> np.ndarray:
    """Read an image with detectron2's ``read_image``; any failure names the file.

    Returns:
        (H, W, C) uint8 array in ``image_format``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but cannot be decoded as an image.
    """
    try:
        return utils.read_image(file_name, format=image_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"Image file not found: {file_name}") from e
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated file), ...
        raise ValueError(f"Cannot read image file {file_name}: {type(e).__name__}: {e}") from e


class DetrDatasetMapper:
    """Map one detectron2 dataset dict to the model's input dict.

    Output dict: ``image`` (C, H, W) uint8 tensor in ``image_format`` (channel order as read, not
    normalised: the model subtracts its pixel mean), the original ``height`` / ``width``, and when
    training (or when ``keep_annotations_at_test``) ``instances`` with ``gt_boxes`` (n, 4) xyxy in
    absolute pixels of the augmented image and ``gt_classes`` (n,) int64.

    Boxes are transformed with the image, clipped to it, and boxes left with no area (e.g. cropped
    out) are removed. An image left with no object is kept as a negative (``instances`` of length 0),
    as in the authors' random crop; it is not re-drawn.
    """

    def __init__(
        self,
        is_train: bool,
        augmentations: Sequence[T.Augmentation],
        image_format: str = "RGB",
        keep_annotations_at_test: bool = False,
        extra_annotation_fields: Sequence[str] = (),
    ):
        """
        Args:
            is_train: whether annotations are mapped (and kept) for training.
            augmentations: applied in order to image and boxes; build the DETR recipe in the config.
            image_format: format given to detectron2's ``read_image`` ("RGB" for the DETR family).
            keep_annotations_at_test: also map annotations when ``is_train`` is False.
            extra_annotation_fields: per-annotation fields carried unchanged through the
                augmentation into ``instances.gt_<field>`` (a tensor with one row per kept box),
                e.g. ``["emotions"]`` for DSCT's (n, 26) labels.
        """
        if not isinstance(augmentations, abc.Sequence) or isinstance(augmentations, str):
            raise TypeError(f"DetrDatasetMapper: augmentations must be a list, got {type(augmentations).__name__}")
        self.is_train = bool(is_train)
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.keep_annotations = self.is_train or keep_annotations_at_test
        if isinstance(extra_annotation_fields, str):
            raise TypeError("DetrDatasetMapper: extra_annotation_fields must be a list of names, not a string")
        self.extra_annotation_fields = list(extra_annotation_fields)
        logger.info(f"DetrDatasetMapper(is_train={self.is_train}) augmentations: {self.augmentations}")

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        if "file_name" not in dataset_dict:
            raise ValueError(f"DetrDatasetMapper: dataset dict has no 'file_name' field: {sorted(dataset_dict)}")
        image = read_image_or_fail(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (H, W)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", None)
        if not self.keep_annotations or annotations is None:
            return dataset_dict
        annotations = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        dataset_dict["instances"] = _annotations_to_instances(
            annotations, image_shape, self.extra_annotation_fields, dataset_dict["file_name"]
        )
        return dataset_dict


def _annotations_to_instances(
    annotations: List[Dict[str, Any]],
    image_shape,
    extra_fields: Sequence[str] = (),
    file_name: str = "",
) -> Instances:
    """Boxes (already transformed and clipped by detectron2) to ``Instances``, dropping empty boxes
    (and the rows of ``extra_fields``, stored as ``gt_<field>``, with them)."""
    instances = utils.annotations_to_instances(annotations, image_shape)
    for field in extra_fields:
        missing = [index for index, obj in enumerate(annotations) if field not in obj]
        if missing:
            raise ValueError(f"DetrDatasetMapper: annotation {missing[0]} of {file_name} has no '{field}' field")
        # With no annotation the tensor is empty, of shape (0,): its width is unknown here.
        instances.set(f"gt_{field}", torch.as_tensor([obj[field] for obj in annotations]))
    # annotations_to_instances keeps zero-area boxes (fully cropped out); remove them so every
    # target has a valid normalised cxcywh box.
    return utils.filter_empty_instances(instances, by_box=True, by_mask=False)
