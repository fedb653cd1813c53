"""Dataset mapper of the DETR family: detectron2's ``DatasetMapper`` with what DETR needs."""

import logging
from collections import abc
from typing import Any, Dict, Sequence

import numpy as np
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
    and empty boxes removed, annotations dropped at test time), with three differences:

    - the arguments a LazyConfig gives: ``augmentations`` a list, ``image_format`` "RGB" by default;
    - a missing or undecodable image fails with an error naming the file;
    - boxes the augmentation leaves empty (a crop that cuts an object out) are counted
      (``num_boxes_emptied`` of ``num_boxes_seen`` in this process) and the count is logged, as
      the degenerate boxes of the dataset are. An image left with no object is kept as a negative
      (``instances`` of length 0), as in the authors' random crop; it is not re-drawn.

    Output dict: ``image`` (C, H, W) uint8 tensor in ``image_format`` (not normalised: the model
    subtracts its pixel mean), the original ``height`` / ``width``, and when training
    ``instances`` with ``gt_boxes`` (n, 4) xyxy in absolute pixels of the augmented image and
    ``gt_classes`` (n,) int64.
    """

    def __init__(
        self, is_train: bool, augmentations: Sequence[T.Augmentation], image_format: str = "RGB"
    ):
        """
        Args:
            is_train: whether annotations are mapped (and kept) for training.
            augmentations: applied in order to image and boxes; build the DETR recipe in the config.
            image_format: format given to detectron2's ``read_image`` ("RGB" for the DETR family).
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
