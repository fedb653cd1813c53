"""EMOTIC (Kosti et al., TPAMI 2019) in the COCO-style json the DSCT authors distribute.

``emotic_{train,val,test}_bi.json``: ``images`` (id, file_name ``<folder>/images/<name>.jpg``,
width, height) and ``annotations`` (image_id, bbox = the person's HEAD box [x, y, w, h] in pixels,
category_id = the person's 26 emotions as one 26-bit integer, the most significant bit being
index 0 = Affection). Only the json is read here; images are opened by the mapper.

Dataset dicts hold one annotation per person: ``bbox`` (the json's box, ``XYWH_ABS``),
``category_id`` 0 (the single class "person") and ``emotions``, a list of 26 ints 0/1 in
``EMOTIC_EMOTIONS`` order. Persons whose box is empty once clamped to the image are dropped and
counted in the log, as the authors' loader drops them.
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = [
    "EMOTIC_EMOTIONS",
    "EMOTIC_SPLITS",
    "decode_emotions",
    "encode_emotions",
    "load_emotion_json",
    "load_emotic_json",
    "emotic_metadata",
    "register_emotic",
    "register_all_emotic",
]

logger = logging.getLogger(__name__)

# The authors' order (test.py, emotic_to_coco.py): bit 25 of category_id (the most significant of
# 26) is Affection, bit 0 is Yearning.
EMOTIC_EMOTIONS = [
    "Affection",
    "Anger",
    "Annoyance",
    "Anticipation",
    "Aversion",
    "Confidence",
    "Disapproval",
    "Disconnection",
    "Disquietment",
    "Doubt/Confusion",
    "Embarrassment",
    "Engagement",
    "Esteem",
    "Excitement",
    "Fatigue",
    "Fear",
    "Happiness",
    "Pain",
    "Peace",
    "Pleasure",
    "Sadness",
    "Sensitivity",
    "Suffering",
    "Surprise",
    "Sympathy",
    "Yearning",
]
EMOTIC_SPLITS = ("train", "val", "test")


def decode_emotions(category_id: int, num_emotions: int = 26) -> List[int]:
    """The authors' label integer -> ``num_emotions`` 0/1 values, most significant bit first
    (``bin(category_id)`` left-padded with zeros, as their loader and ``test.py``)."""
    if isinstance(category_id, bool) or not isinstance(category_id, (int, np.integer)):
        raise ValueError(f"category_id must be an integer, got {category_id!r}")
    if not 0 <= int(category_id) < 2**num_emotions:
        raise ValueError(f"category_id {category_id} is outside [0, 2^{num_emotions})")
    return [(int(category_id) >> (num_emotions - 1 - index)) & 1 for index in range(num_emotions)]


def encode_emotions(emotions: Sequence[int]) -> int:
    """Inverse of :func:`decode_emotions`: 0/1 values, index 0 the most significant bit."""
    value = 0
    for flag in emotions:
        if flag not in (0, 1):
            raise ValueError(f"emotions must hold only 0 and 1, got {list(emotions)}")
        value = (value << 1) | int(flag)
    return value


def _fail(json_file: str, where: str, message: str) -> ValueError:
    return ValueError(f"{json_file}: {where}: {message}")


def _field(record: Dict[str, Any], name: str, json_file: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise _fail(json_file, where, f"must be an object, got {type(record).__name__}")
    if name not in record:
        raise _fail(json_file, where, f"missing field '{name}'")
    return record[name]


def _box_is_empty(bbox: Sequence[float], width: int, height: int) -> bool:
    """The authors' test: corners clamped to the image, kept when x2 > x1 and y2 > y1."""
    x0, y0, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x0 + w, 0.0), width), min(max(y0 + h, 0.0), height)
    x0, y0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    return not (x1 > x0 and y1 > y0)


def load_emotion_json(
    json_file: str,
    image_root: str,
    label_decoder,
    dataset_name: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Read a COCO-style json of person (head or face) boxes with emotion labels.

    Args:
        json_file: the annotation file.
        image_root: folder the images' ``file_name`` is relative to.
        label_decoder: ``category_id -> list of 0/1`` (raises ValueError for a bad value).
        dataset_name: for the log.

    Returns:
        detectron2 dataset dicts sorted by image id (the authors' evaluation order), each with
        ``file_name``, ``height``, ``width``, ``image_id`` and ``annotations`` (see the module
        docstring); images without persons are kept with an empty list.

    Raises:
        FileNotFoundError: no ``json_file``.
        ValueError: naming the file and the entry (``images[i]`` / ``annotations[i]`` with its id)
            for a missing field, an unknown image id or a bad label.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file {json_file} does not exist")
    with open(json_file) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_file}: not valid json: {error}") from error
    if not isinstance(content, dict):
        raise _fail(json_file, "top level", "must be an object with 'images' and 'annotations'")
    images = _field(content, "images", json_file, "top level")
    annotations = _field(content, "annotations", json_file, "top level")

    records: Dict[Any, Dict[str, Any]] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        image_id = _field(image, "id", json_file, where)
        where = f"images[{index}] (id {image_id})"
        file_name = _field(image, "file_name", json_file, where)
        width, height = (_field(image, key, json_file, where) for key in ("width", "height"))
        if image_id in records:
            raise _fail(json_file, where, "duplicate image id")
        records[image_id] = {
            "file_name": os.path.join(image_root, file_name),
            "height": int(height),
            "width": int(width),
            "image_id": image_id,
            "annotations": [],
        }

    num_dropped = 0
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        if isinstance(annotation, dict) and "id" in annotation:
            where += f" (id {annotation['id']})"
        image_id = _field(annotation, "image_id", json_file, where)
        bbox = _field(annotation, "bbox", json_file, where)
        category_id = _field(annotation, "category_id", json_file, where)
        if image_id not in records:
            raise _fail(json_file, where, f"image_id {image_id} is not in 'images'")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise _fail(json_file, where, f"bbox must be [x, y, w, h], got {bbox!r}")
        try:
            emotions = label_decoder(category_id)
        except ValueError as error:
            raise _fail(json_file, where, str(error)) from error
        if annotation.get("iscrowd", 0):
            continue
        record = records[image_id]
        if _box_is_empty(bbox, record["width"], record["height"]):
            num_dropped += 1
            continue
        record["annotations"].append(
            {
                "bbox": [float(v) for v in bbox],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 0,
                "emotions": emotions,
                "iscrowd": 0,
            }
        )
    dataset_dicts = [records[key] for key in sorted(records)]
    num_persons = sum(len(record["annotations"]) for record in dataset_dicts)
    logger.info(
        f"Loaded {len(dataset_dicts)} images and {num_persons} persons from {json_file}"
        + (f" ({dataset_name})" if dataset_name else "")
        + f"; dropped {num_dropped} persons with an empty or out-of-image box"
    )
    return dataset_dicts


def load_emotic_json(
    json_file: str, image_root: str, dataset_name: Optional[str] = None
) -> List[Dict[str, Any]]:
    """EMOTIC dataset dicts from the authors' ``emotic_*_bi.json`` (see the module docstring)."""
    return load_emotion_json(json_file, image_root, decode_emotions, dataset_name)


def emotic_metadata(json_file: str, image_root: str) -> Dict[str, Any]:
    """Metadata of an EMOTIC-format dataset: ``emotion_classes`` (the 26 emotions),
    ``thing_classes`` ["person"], ``json_file``, ``image_root``, ``evaluator_type`` "emotic"."""
    return dict(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="emotic",
        thing_classes=["person"],
        emotion_classes=list(EMOTIC_EMOTIONS),
    )


def register_emotic(name: str, json_file: str, image_root: str) -> None:
    """Register an EMOTIC-format dataset under ``name`` (the json is read on first use), with
    the metadata of :func:`emotic_metadata`."""
    DatasetCatalog.register(name, lambda: load_emotic_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(**emotic_metadata(json_file, image_root))


def register_all_emotic(root: str) -> List[str]:
    """``emotic_{train,val,test}``: ``<root>/emotic/annotations/emotic_<split>_bi.json`` with the
    images under ``<root>/emotic/images/`` (``<folder>/images/<name>.jpg``)."""
    names = []
    for split in EMOTIC_SPLITS:
        name = f"emotic_{split}"
        if name in DatasetCatalog.list():
            continue
        register_emotic(
            name,
            os.path.join(root, "emotic", "annotations", f"emotic_{split}_bi.json"),
            os.path.join(root, "emotic", "images"),
        )
        names.append(name)
    return names
