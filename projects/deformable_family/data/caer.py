"""CAER-S (Lee et al., ICCV 2019) in the COCO-style face-box jsons of the DSCT authors.

``caer_{train,val,test}.json``: ``images`` (file_name ``<Class>/<file>`` relative to the split's
folder ``CAER_S/train`` or ``CAER_S/test``; the authors' train and val both come from ``train/``),
``annotations`` (bbox = a FACE box [x, y, w, h], category_id 0..6 in ``CAER_S_CLASSES`` order).
Dataset dicts are as EMOTIC's (:mod:`deformable_family.data.emotic`) with ``emotions`` the one-hot of
the face's class.
"""

import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from .emotic import load_emotion_json

__all__ = ["CAER_S_CLASSES", "load_caer_json", "register_caer_s", "register_all_caer_s"]

CAER_S_CLASSES = ["Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]
# split -> image folder under CAER_S/ (the authors' caer.py: train and val from train/).
_CAER_S_IMAGE_FOLDERS = {"train": "train", "val": "train", "test": "test"}


def _one_hot(category_id) -> List[int]:
    if isinstance(category_id, bool) or not isinstance(category_id, int):
        raise ValueError(f"category_id must be an integer, got {category_id!r}")
    if not 0 <= category_id < len(CAER_S_CLASSES):
        raise ValueError(f"category_id {category_id} is outside [0, {len(CAER_S_CLASSES)})")
    return [int(index == category_id) for index in range(len(CAER_S_CLASSES))]


def load_caer_json(
    json_file: str, image_root: str, dataset_name: Optional[str] = None
) -> List[Dict[str, Any]]:
    """CAER-S dataset dicts: one annotation per face with a 7-way one-hot ``emotions``."""
    return load_emotion_json(json_file, image_root, _one_hot, dataset_name)


def register_caer_s(name: str, json_file: str, image_root: str) -> None:
    """Register a CAER-S-format dataset under ``name`` (the json is read on first use).

    Metadata: ``emotion_classes`` (the 7 classes), ``thing_classes`` ["face"], ``json_file``,
    ``image_root``, ``evaluator_type`` "caer_s".
    """
    DatasetCatalog.register(name, lambda: load_caer_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="caer_s",
        thing_classes=["face"],
        emotion_classes=list(CAER_S_CLASSES),
    )


def register_all_caer_s(root: str) -> List[str]:
    """``caer_s_{train,val,test}``: ``<root>/CAER_S/annotations/caer_<split>.json``, images under
    ``<root>/CAER_S/train`` (train, val) or ``<root>/CAER_S/test``."""
    names = []
    for split, folder in _CAER_S_IMAGE_FOLDERS.items():
        name = f"caer_s_{split}"
        if name in DatasetCatalog.list():
            continue
        register_caer_s(
            name,
            os.path.join(root, "CAER_S", "annotations", f"caer_{split}.json"),
            os.path.join(root, "CAER_S", folder),
        )
        names.append(name)
    return names
