"""Dataset mapper of the DETR family: detectron2's ``DatasetMapper`` with what DETR needs."""

import logging
from collections import abc
from typing import Any, Dict, Sequence

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.logger import log_every_n_seconds
from PIL import Image

__all__ = ["DetrDatasetMapper", "read_image_or_fail"]

logger = logging.getLogger(__name__)

# What PIL / detectron2's read_image raise for a file that exists but cannot be decoded
# (UnidentifiedImageError and truncated files are OSErrors; some broken PNGs raise SyntaxError).
# MemoryError and the like are not the file's fault and pass through unchanged.
_DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def read_image_or_fail(file_name: str, image_format: str) -> np.ndarray:
    """Read an image with detectron2's ``read_image``; a missing or undecodable file is named.

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
    except _DECODE_ERRORS as e:
        raise ValueError(f"Cannot read image file {file_name}: {type(e).__name__}: {e}") from e


class DetrDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` (read, size check, augmentation of image and boxes, crowd
    and empty boxes removed, annotations dropped at test time), with four differences:

    - the arguments a LazyConfig gives: ``augmentations`` a list, ``image_format`` "RGB" by default;
    - a missing or undecodable image fails with an error naming the file;
    - boxes the augmentation leaves empty (a crop that cuts an object out) are counted
      (``num_boxes_emptied`` of ``num_boxes_seen`` in this process) and the count is logged, as
      the degenerate boxes of the dataset are. An image left with no object is kept as a negative
      (``instances`` of length 0), as in the authors' random crop; it is not re-drawn;
    - ``extra_annotation_fields`` carries per-annotation fields (DSCT's ``emotions``) unchanged into
      ``instances.gt_<field>``, one row per kept box.

    Output dict: ``image`` (C, H, W) uint8 tensor in ``image_format`` (not normalised: the model
    subtracts its pixel mean), the original ``height`` / ``width``, and when training
    ``instances`` with ``gt_boxes`` (n, 4) xyxy in absolute pixels of the augmented image and
    ``gt_classes`` (n,) int64.
    """

    def __init__(
        self,
        is_train: bool,
        augmentations: Sequence[T.Augmentation],
        image_format: str = "RGB",
        extra_annotation_fields: Sequence[str] = (),
    ):
        """
        Args:
            is_train: whether annotations are mapped (and kept) for training.
            augmentations: applied in order to image and boxes; build the DETR recipe in the config.
            image_format: format given to detectron2's ``read_image`` ("RGB" for the DETR family).
            extra_annotation_fields: per-annotation fields carried unchanged through the
                augmentation into ``instances.gt_<field>`` (a tensor with one row per kept box),
                e.g. ``["emotions"]`` for DSCT's (n, 26) labels.
        """
        if not isinstance(augmentations, abc.Sequence) or isinstance(augmentations, str):
            raise TypeError(
                f"DetrDatasetMapper: augmentations must be a list, got {type(augmentations).__name__}"
            )
        super().__init__(
            bool(is_train), augmentations=list(augmentations), image_format=image_format
        )
        self.num_boxes_seen = 0
        self.num_boxes_emptied = 0
        if isinstance(extra_annotation_fields, str):
            raise TypeError(
                "DetrDatasetMapper: extra_annotation_fields must be a list of names, not a string"
            )
        self.extra_annotation_fields = list(extra_annotation_fields)

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        if "file_name" not in dataset_dict:
            raise ValueError(
                f"DetrDatasetMapper: dataset dict has no 'file_name' field: {sorted(dataset_dict)}"
            )
        file_name = dataset_dict["file_name"]
        try:
            return super().__call__(dataset_dict)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Image file not found: {file_name}") from e
        except _DECODE_ERRORS as e:
            raise ValueError(f"Cannot read image file {file_name}: {type(e).__name__}: {e}") from e

    def _transform_annotations(self, dataset_dict, transforms, image_shape) -> None:
        # detectron2's extension point: transform, drop crowd boxes, build Instances, drop empty
        # boxes. Here it also counts the boxes the augmentation emptied.
        num_boxes = sum(1 for obj in dataset_dict["annotations"] if obj.get("iscrowd", 0) == 0)
        if self.extra_annotation_fields:
            self._transform_with_extra_fields(dataset_dict, transforms, image_shape)
        else:
            super()._transform_annotations(dataset_dict, transforms, image_shape)
        emptied = num_boxes - len(dataset_dict["instances"])
        self.num_boxes_seen += num_boxes
        self.num_boxes_emptied += emptied
        if emptied:
            log_every_n_seconds(
                logging.INFO,
                f"DetrDatasetMapper: dropped {self.num_boxes_emptied} of {self.num_boxes_seen} boxes "
                "left empty by the augmentation (e.g. cropped out) in this process so far",
                n=300,
                name=__name__,
            )

    def _transform_with_extra_fields(self, dataset_dict, transforms, image_shape) -> None:
        """detectron2's steps (transform the non-crowd boxes, build Instances, drop empty boxes)
        with the extra fields set before the empty boxes are dropped, so that they stay aligned
        (``annotations_to_instances`` keeps only the fields it knows)."""
        annotations = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in dataset_dict.pop("annotations")
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annotations, image_shape)
        for field in self.extra_annotation_fields:
            missing = [index for index, obj in enumerate(annotations) if field not in obj]
            if missing:
                raise ValueError(
                    f"DetrDatasetMapper: annotation {missing[0]} of {dataset_dict['file_name']} "
                    f"has no '{field}' field"
                )
            # With no annotation the tensor is empty, of shape (0,): its width is unknown here.
            instances.set(f"gt_{field}", torch.as_tensor([obj[field] for obj in annotations]))
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
