import os

from .caer import CAER_S_CLASSES, load_caer_json, register_all_caer_s, register_caer_s
from .dataset_dicts import class_histogram, drop_degenerate_boxes, load_dataset_dicts
from .mapper import DetrDatasetMapper, read_image_or_fail
from .shapes import SHAPES_CLASSES, default_shapes_root, generate_shapes, register_shapes
from .emotic import (
    EMOTIC_EMOTIONS,
    decode_emotions,
    encode_emotions,
    load_emotic_json,
    register_all_emotic,
    register_emotic,
)
from .synthetic_emotions import generate_synthetic_emotions, register_synthetic_emotions
from .transforms import RandomChoiceAugmentation, RandomSelect, detr_train_augmentations

# The built-in synthetic dataset: "shapes_train" and "shapes_val", generated on first use.
register_shapes()
# EMOTIC (emotic_{train,val,test}) and CAER-S (caer_s_{train,val,test}) under $DETECTRON2_DATASETS,
# and the synthetic emotion dataset ("emotic_synthetic_train"/"_val", generated on first use).
register_all_emotic(os.environ.get("DETECTRON2_DATASETS", "datasets"))
register_all_caer_s(os.environ.get("DETECTRON2_DATASETS", "datasets"))
register_synthetic_emotions()

__all__ = [
    "CAER_S_CLASSES",
    "EMOTIC_EMOTIONS",
    "decode_emotions",
    "encode_emotions",
    "generate_synthetic_emotions",
    "load_caer_json",
    "load_emotic_json",
    "register_all_caer_s",
    "register_all_emotic",
    "register_caer_s",
    "register_emotic",
    "register_synthetic_emotions",
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
