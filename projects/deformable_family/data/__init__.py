from .dataset_dicts import class_histogram, drop_degenerate_boxes, load_dataset_dicts
from .mapper import DetrDatasetMapper, read_image_or_fail
from .transforms import RandomChoiceAugmentation, RandomSelect

__all__ = [
    "DetrDatasetMapper",
    "RandomChoiceAugmentation",
    "RandomSelect",
    "class_histogram",
    "drop_degenerate_boxes",
    "load_dataset_dicts",
    "read_image_or_fail",
]
