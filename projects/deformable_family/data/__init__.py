from .dataset_dicts import class_histogram, drop_degenerate_boxes, load_dataset_dicts
from .mapper import DetrDatasetMapper, read_image_or_fail
from .shapes import SHAPES_CLASSES, default_shapes_root, generate_shapes, register_shapes
from .transforms import RandomChoiceAugmentation, RandomSelect, detr_train_augmentations

# The built-in synthetic dataset: "shapes_train" and "shapes_val", generated on first use.
register_shapes()

__all__ = [
    "DetrDatasetMapper",
    "SHAPES_CLASSES",
    "RandomChoiceAugmentation",
    "RandomSelect",
    "class_histogram",
    "default_shapes_root",
    "detr_train_augmentations",
    "drop_degenerate_boxes",
    "generate_shapes",
    "load_dataset_dicts",
    "read_image_or_fail",
    "register_shapes",
]
