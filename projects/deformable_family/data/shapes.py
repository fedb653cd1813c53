"""A small synthetic detection dataset ("shapes") generated on first use, for tests and the CPU
quickstart.

Each image (112-144 px per side) has 1-4 objects of 5 categories, each with a random colour (the
colour says nothing about the category), size (16-56 px), aspect ratio (up to 1:1.5 either way) and
orientation, drawn over a clutter background: a colour gradient, Gaussian noise, random lines and
blurred distractor blobs. Objects may overlap (IoU up to 0.2; a later object hides part of an
earlier one, whose box stays the full shape, as COCO's amodal boxes).

The dataset is written as COCO json plus PNG images into ``<root>/shapes_v1/`` with ``root``
defaulting to ``$DETECTRON2_DATASETS`` or ``./datasets``. Generation is deterministic (seeded per
image) and atomic: it is written into a temporary folder renamed into place when complete, so an
interrupted generation is never mistaken for a finished one. The parameters it was generated with
(version, images per split, seed) are written beside it in ``params.json``; a folder is reused only
when they match the ones asked for, and refused with an error otherwise.
"""
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["SHAPES_CLASSES", "SHAPES_SPLITS", "default_shapes_root", "generate_shapes", "register_shapes"]

logger = logging.getLogger(__name__)

SHAPES_CLASSES = ["circle", "rectangle", "triangle", "cross", "ring"]
# split -> (number of images, seed offset); the seed offset keeps the splits disjoint.
SHAPES_SPLITS = {"train": (2000, 0), "val": (200, 1)}
SHAPES_VERSION = "shapes_v1"

_IMAGE_SIDE_RANGE = (112, 144)
_OBJECT_SIZE_RANGE = (16, 56)
_MAX_ASPECT = 1.5
_MAX_OVERLAP_IOU = 0.2
_MAX_OBJECTS = 4


def default_shapes_root() -> str:
    """``$DETECTRON2_DATASETS/shapes_v1`` (``./datasets/shapes_v1`` when unset)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), SHAPES_VERSION)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box (4,) against (n, 4) boxes."""
    if len(boxes) == 0:
        return np.zeros(0)
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area + areas - inter)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colour gradient with noise, lines and blurred blobs; float32 (H, W, 3) in [0, 255]."""
    top, bottom = rng.uniform(0, 255, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1), np.float32)
    blobs = np.zeros_like(image)
    for _ in range(rng.integers(0, 4)):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(3, 20)), int(rng.integers(3, 20)))
        cv2.ellipse(blobs, center, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
    mask = cv2.GaussianBlur((blobs.sum(axis=2, keepdims=True) > 0).astype(np.float32), (0, 0), 3)[..., None]
    image = image * (1 - mask) + cv2.GaussianBlur(blobs, (0, 0), 3) * mask
    for _ in range(rng.integers(1, 5)):
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, p0, p1, rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 3)), cv2.LINE_AA)
    return image


def _draw_object(image: np.ndarray, rng: np.random.Generator, category: str, box: np.ndarray) -> None:
    """Draw one object filling the xyxy ``box`` exactly (its tight box is ``box``)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    color = rng.uniform(0, 255, 3)
    # Keep the object visible against the local background: push the colour away from it.
    local = image[int(y0):int(y1), int(x0):int(x1)].reshape(-1, 3).mean(axis=0)
    if np.abs(color - local).max() < 60:
        color = np.where(local > 127, local - 110, local + 110)
    color = np.clip(color, 0, 255).tolist()
    shift = 4  # cv2 sub-pixel precision: coordinates in 1/16 px
    scale = 1 << shift

    def pts(points):
        return [np.round(np.asarray(points) * scale).astype(np.int32)]

    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if category in ("circle", "ring"):
        # The ellipse is inscribed in the box; a ring's hole (40-70% of its size) shows what was
        # there before it was drawn.
        before = image.copy() if category == "ring" else None
        center = (int(round(cx * scale)), int(round(cy * scale)))
        axes = (int(round(w / 2 * scale)), int(round(h / 2 * scale)))
        cv2.ellipse(image, center, axes, 0, 0, 360, color, -1, cv2.LINE_AA, shift)
        if category == "ring":
            hole = rng.uniform(0.4, 0.7)
            inner = (int(round(w / 2 * hole * scale)), int(round(h / 2 * hole * scale)))
            hole_mask = np.zeros(image.shape[:2], np.float32)
            cv2.ellipse(hole_mask, center, inner, 0, 0, 360, 1.0, -1, cv2.LINE_AA, shift)
            image[:] = image * (1 - hole_mask[..., None]) + before * hole_mask[..., None]
    elif category == "rectangle":
        cv2.fillPoly(image, pts([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), color, cv2.LINE_AA, shift)
    elif category == "triangle":
        # Apex on one side of the box (chosen at random), base on the opposite side.
        side = int(rng.integers(0, 4))
        t = rng.uniform(0.2, 0.8)
        if side == 0:
            corners = [[x0 + t * w, y0], [x1, y1], [x0, y1]]
        elif side == 1:
            corners = [[x0 + t * w, y1], [x1, y0], [x0, y0]]
        elif side == 2:
            corners = [[x0, y0 + t * h], [x1, y0], [x1, y1]]
        else:
            corners = [[x1, y0 + t * h], [x0, y0], [x0, y1]]
        cv2.fillPoly(image, pts(corners), color, cv2.LINE_AA, shift)
    elif category == "cross":
        arm = rng.uniform(0.25, 0.45)
        ax, ay = w * arm / 2, h * arm / 2
        cv2.fillPoly(image, pts([[cx - ax, y0], [cx + ax, y0], [cx + ax, y1], [cx - ax, y1]]), color, cv2.LINE_AA, shift)
        cv2.fillPoly(image, pts([[x0, cy - ay], [x1, cy - ay], [x1, cy + ay], [x0, cy + ay]]), color, cv2.LINE_AA, shift)
    else:
        raise ValueError(f"unknown shapes category {category!r}")


def _make_image(seed: Tuple[int, ...]) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """One image (H, W, 3) uint8 RGB and its annotations (xyxy boxes, category indices)."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(_IMAGE_SIDE_RANGE[0], _IMAGE_SIDE_RANGE[1] + 1, size=2))
    image = _background(rng, height, width)
    boxes = np.zeros((0, 4))
    objects = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        for _attempt in range(20):
            size = rng.uniform(*_OBJECT_SIZE_RANGE)
            aspect = np.exp(rng.uniform(-np.log(_MAX_ASPECT), np.log(_MAX_ASPECT)))
            w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
            if w >= width - 2 or h >= height - 2:
                continue
            x0, y0 = rng.uniform(1, width - 1 - w), rng.uniform(1, height - 1 - h)
            box = np.array([x0, y0, x0 + w, y0 + h])
            if np.all(_iou(box, boxes) <= _MAX_OVERLAP_IOU):
                break
        else:
            continue
        category = int(rng.integers(0, len(SHAPES_CLASSES)))
        _draw_object(image, rng, SHAPES_CLASSES[category], box)
        boxes = np.vstack([boxes, box])
        objects.append({"box": box, "category": category})
    image = image + rng.normal(0, rng.uniform(3, 10), size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _write_split(folder: str, split: str, num_images: int, seed: int) -> None:
    image_dir = os.path.join(folder, split)
    os.makedirs(image_dir)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = _make_image((seed, SHAPES_SPLITS[split][1], index))
        file_name = f"{index:06d}.png"
        # cv2 writes BGR; the array is RGB.
        if not cv2.imwrite(os.path.join(image_dir, file_name), image[:, :, ::-1]):
            raise OSError(f"cannot write {os.path.join(image_dir, file_name)}")
        images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
        for obj in objects:
            x0, y0, x1, y1 = (round(float(v), 2) for v in obj["box"])
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": index + 1,
                "category_id": obj["category"] + 1,
                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round((x1 - x0) * (y1 - y0), 2),
                "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"deformable_family synthetic {SHAPES_VERSION} {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES_CLASSES)],
    }
    with open(os.path.join(folder, f"{split}.json"), "w") as f:
        json.dump(coco, f)


PARAMS_FILE = "params.json"


def _check_existing(root: str, params: Dict[str, Any]) -> None:
    """Refuse a dataset folder generated with other parameters (or by an earlier version, which
    wrote no parameters): reusing it would silently train and evaluate on other data."""
    path = os.path.join(root, PARAMS_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"generate_shapes: {root} exists but has no {PARAMS_FILE}: it was not generated by this "
            f"version of deformable_family (or not completely). Delete it to regenerate {params}, or "
            "point DETECTRON2_DATASETS (or the root argument) elsewhere."
        )
    with open(path) as f:
        existing = json.load(f)
    if existing != params:
        raise ValueError(
            f"generate_shapes: {root} was generated with {existing}, not the requested {params}. "
            "Delete it to regenerate, or use another root (DETECTRON2_DATASETS)."
        )


def generate_shapes(root: str, num_images: Optional[Dict[str, int]] = None, seed: int = 0) -> str:
    """Generate the dataset into ``root`` unless a complete copy with the same parameters is
    already there (a copy with other parameters is refused with ValueError).

    Args:
        root: the dataset folder (e.g. ``datasets/shapes_v1``); it appears only once complete.
        num_images: images per split, default ``{"train": 2000, "val": 200}``.
        seed: base seed; image i of a split is drawn from ``(seed, split offset, i)``.

    Returns:
        ``root``.
    """
    num_images = dict(num_images or {split: n for split, (n, _) in SHAPES_SPLITS.items()})
    for split, n in num_images.items():
        if split not in SHAPES_SPLITS:
            raise ValueError(f"generate_shapes: unknown split {split!r}; expected one of {sorted(SHAPES_SPLITS)}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"generate_shapes: num_images[{split!r}] must be a positive int, got {n!r}")
    params = {"version": SHAPES_VERSION, "num_images": num_images, "seed": seed}
    if os.path.isdir(root):
        _check_existing(root, params)
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    logger.info(f"Generating the synthetic shapes dataset into {root} ({num_images}, seed {seed}) ...")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        for split, n in num_images.items():
            _write_split(tmp, split, n, seed)
        with open(os.path.join(tmp, PARAMS_FILE), "w") as f:
            json.dump(params, f)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process (e.g. another rank) finished first: its copy is identical if its
            # parameters are.
            if not os.path.isdir(root):
                raise
            _check_existing(root, params)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def register_shapes(
    prefix: str = "shapes",
    root: Optional[str] = None,
    num_images: Optional[Dict[str, int]] = None,
    seed: int = 0,
) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` (or the splits of ``num_images``).

    Nothing is generated until a split's dicts are first requested from DatasetCatalog.

    Returns:
        The registered dataset names.
    """
    root = root or default_shapes_root()
    num_images = dict(num_images or {split: n for split, (n, _) in SHAPES_SPLITS.items()})
    names = []
    for split in num_images:
        name = f"{prefix}_{split}"
        json_file = os.path.join(root, f"{split}.json")
        image_root = os.path.join(root, split)

        def load(json_file=json_file, image_root=image_root, name=name):
            generate_shapes(root, num_images, seed)
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_file, image_root=image_root, evaluator_type="coco", thing_classes=list(SHAPES_CLASSES)
        )
        names.append(name)
    return names
