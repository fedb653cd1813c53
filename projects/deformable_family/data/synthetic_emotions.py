"""A synthetic emotion-in-context dataset in EMOTIC's json format, generated on first use, for tests
and the DSCT CPU quickstart.

Each image (136-168 x 112-136 px) shows 1-4 "persons": a coloured round head (the annotated head
box) with two eyes and a mouth, on a grey body. Around them: a scene (calm light gradient, busy
stripes, or dark), sometimes a gift (white box with a black cross) and a fire (orange triangle),
and grey balls as distractors. The 26 EMOTIC emotions of a person follow fixed rules on three
kinds of evidence, so that a model must look beyond the head for most of them:

- own appearance (11): head colour (red, yellow, blue, green, purple) and mouth (smile, frown,
  open), e.g. Anger = red head, Surprise = open mouth;
- the scene and objects (7), never the head itself, e.g. Peace = calm scene, Fear = a fire;
- the other persons (8), e.g. Disconnection = alone, Sympathy = another person has a blue head.

The exact rules are ``EMOTION_RULES``. The json (``annotations/emotic_<split>_bi.json``: head boxes
in integer pixels, the 26 labels as one integer with Affection the most significant bit) and PNG
images (``images/synthetic/images/<split>_<index>.png``) are written into
``<root>/emotic_synthetic_v1/`` (root: ``$DETECTRON2_DATASETS`` or ``./datasets``), read by the same
loader as EMOTIC. Generation is deterministic (seeded per image) and atomic, as the shapes dataset.
"""

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .emotic import EMOTIC_EMOTIONS, emotic_metadata, encode_emotions, load_emotic_json

__all__ = [
    "EMOTION_RULES",
    "SYNTHETIC_EMOTIONS_SPLITS",
    "default_synthetic_emotions_root",
    "generate_synthetic_emotions",
    "register_synthetic_emotions",
]

logger = logging.getLogger(__name__)

SYNTHETIC_EMOTIONS_VERSION = "emotic_synthetic_v1"
# split -> (number of images, seed offset).
SYNTHETIC_EMOTIONS_SPLITS = {"train": (2000, 0), "val": (250, 1)}

HEAD_COLOURS = {
    "red": (220, 40, 40),
    "yellow": (235, 210, 40),
    "blue": (40, 70, 225),
    "green": (40, 180, 60),
    "purple": (150, 50, 195),
}
MOUTHS = ("smile", "frown", "open")
SCENES = ("calm", "busy", "dark")

_WIDTH_RANGE, _HEIGHT_RANGE = (136, 168), (112, 136)
_HEAD_DIAMETER_RANGE = (18, 28)
# Images with 1, 2, 3, 4 persons drawn with these probabilities (fewer is more common, as in EMOTIC).
_PERSON_COUNT_PROBS = (0.35, 0.3, 0.2, 0.15)
_OBJECT_PROB = 0.3

Person = Dict[str, Any]
Context = Dict[str, Any]  # scene, gift, fire, persons


def _others(person: Person, context: Context) -> List[Person]:
    return [other for other in context["persons"] if other is not person]


def _another(colour: Optional[str] = None, mouth: Optional[str] = None):
    """Rule: some other person of the image has this head colour and/or mouth."""

    def rule(person: Person, context: Context) -> bool:
        return any(
            (colour is None or other["colour"] == colour)
            and (mouth is None or other["mouth"] == mouth)
            for other in _others(person, context)
        )

    return rule


def _own(colour: Optional[str] = None, mouth: Optional[str] = None):
    """Rule: the person's own head has this colour and/or mouth."""
    return lambda p, c: (colour is None or p["colour"] == colour) and (
        mouth is None or p["mouth"] == mouth
    )


# Emotion -> (kind of evidence, rule(person, context)). Kinds: "appearance" (the head itself),
# "scene" (background and objects, never the head), "others" (the other persons). Conjunctions
# keep most labels rare (mean positive rate about 0.19, as EMOTIC's 0.22 on its test split), so
# that chance-level mAP is low.
EMOTION_RULES: Dict[str, Tuple[str, Callable[[Person, Context], bool]]] = {
    "Affection": ("others", _another("yellow", "smile")),
    "Anger": ("appearance", _own("red")),
    "Annoyance": ("appearance", _own("red", "frown")),
    "Anticipation": ("scene", lambda p, c: c["gift"]),
    "Aversion": ("scene", lambda p, c: c["fire"] and c["scene"] == "dark"),
    "Confidence": ("appearance", _own(mouth="smile")),
    "Disapproval": ("others", _another("red")),
    "Disconnection": ("others", lambda p, c: len(c["persons"]) == 1),
    "Disquietment": ("scene", lambda p, c: c["scene"] == "dark"),
    "Doubt/Confusion": (
        "appearance",
        lambda p, c: p["mouth"] == "frown" and p["colour"] in ("green", "blue"),
    ),
    "Embarrassment": ("others", _another("red", "open")),
    "Engagement": ("others", lambda p, c: len(c["persons"]) == 2),
    "Esteem": ("scene", lambda p, c: c["gift"] and c["scene"] == "calm"),
    "Excitement": ("scene", lambda p, c: c["scene"] == "busy"),
    "Fatigue": ("appearance", _own("green")),
    "Fear": ("scene", lambda p, c: c["fire"]),
    "Happiness": ("appearance", _own("yellow", "smile")),
    "Pain": ("appearance", _own("purple", "frown")),
    "Peace": ("scene", lambda p, c: c["scene"] == "calm" and not c["fire"]),
    "Pleasure": ("appearance", _own("yellow")),
    "Sadness": ("appearance", _own("blue")),
    "Sensitivity": ("others", _another("blue", "frown")),
    "Suffering": ("appearance", _own("blue", "frown")),
    "Surprise": ("appearance", _own(mouth="open")),
    "Sympathy": ("others", _another("blue")),
    "Yearning": ("others", lambda p, c: len(c["persons"]) == 1 and c["scene"] == "dark"),
}
assert list(EMOTION_RULES) == EMOTIC_EMOTIONS


def default_synthetic_emotions_root() -> str:
    """``$DETECTRON2_DATASETS/emotic_synthetic_v1`` (``./datasets/...`` when unset)."""
    return os.path.join(
        os.environ.get("DETECTRON2_DATASETS", "datasets"), SYNTHETIC_EMOTIONS_VERSION
    )


def person_emotions(person: Person, context: Context) -> List[int]:
    """The 26 labels of ``person`` in EMOTIC order, by ``EMOTION_RULES``."""
    return [int(bool(rule(person, context))) for _, rule in EMOTION_RULES.values()]


def _scene(rng: np.random.Generator, scene: str, height: int, width: int) -> np.ndarray:
    """float32 (H, W, 3) background in [0, 255]."""
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    if scene == "busy":
        first, second = rng.uniform(60, 200, size=(2, 3))
        period = rng.uniform(8, 14)
        angle = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
        stripes = ((phase % 1.0) < 0.5)[..., None]
        return np.where(stripes, first, second).astype(np.float32)
    low, high = (150, 235) if scene == "calm" else (15, 70)
    top, bottom = rng.uniform(low, high, size=(2, 3))
    return (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1), np.float32)


def _overlaps(box: np.ndarray, boxes: List[np.ndarray], margin: float = 2.0) -> bool:
    for other in boxes:
        if (
            box[0] < other[2] + margin
            and other[0] < box[2] + margin
            and box[1] < other[3] + margin
            and other[1] < box[3] + margin
        ):
            return True
    return False


def _draw_person(image: np.ndarray, person: Person) -> None:
    cx, cy, radius = person["cx"], person["cy"], person["radius"]
    body = person["body_box"]
    cv2.rectangle(
        image, (int(body[0]), int(body[1])), (int(body[2]), int(body[3])), person["body_colour"], -1
    )
    cv2.circle(
        image,
        (int(round(cx)), int(round(cy))),
        int(round(radius)),
        HEAD_COLOURS[person["colour"]],
        -1,
        cv2.LINE_AA,
    )
    dark = (20, 20, 20)
    eye_dx, eye_y = radius * 0.38, cy - radius * 0.25
    eye = max(1, int(round(radius * 0.13)))
    for sign in (-1, 1):
        cv2.circle(
            image, (int(round(cx + sign * eye_dx)), int(round(eye_y))), eye, dark, -1, cv2.LINE_AA
        )
    mouth_w = max(2, int(round(radius * 0.5)))
    mouth_h = max(2, int(round(radius * 0.3)))
    thickness = max(1, int(round(radius * 0.15)))
    if person["mouth"] == "smile":
        cv2.ellipse(
            image,
            (int(round(cx)), int(round(cy + radius * 0.2))),
            (mouth_w, mouth_h),
            0,
            20,
            160,
            dark,
            thickness,
            cv2.LINE_AA,
        )
    elif person["mouth"] == "frown":
        cv2.ellipse(
            image,
            (int(round(cx)), int(round(cy + radius * 0.6))),
            (mouth_w, mouth_h),
            0,
            200,
            340,
            dark,
            thickness,
            cv2.LINE_AA,
        )
    else:
        cv2.ellipse(
            image,
            (int(round(cx)), int(round(cy + radius * 0.45))),
            (max(2, mouth_w // 2), mouth_h),
            0,
            0,
            360,
            dark,
            -1,
            cv2.LINE_AA,
        )


def _make_image(seed: Tuple[int, ...]) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """One image (H, W, 3) uint8 RGB and its persons (integer xywh head box, 26 labels)."""
    rng = np.random.default_rng(seed)
    width = int(rng.integers(_WIDTH_RANGE[0], _WIDTH_RANGE[1] + 1))
    height = int(rng.integers(_HEIGHT_RANGE[0], _HEIGHT_RANGE[1] + 1))
    scene = SCENES[int(rng.integers(0, len(SCENES)))]
    image = _scene(rng, scene, height, width)

    persons: List[Person] = []
    occupied: List[np.ndarray] = []  # head and body boxes (xyxy) already placed
    for _ in range(1 + int(rng.choice(len(_PERSON_COUNT_PROBS), p=_PERSON_COUNT_PROBS))):
        for _attempt in range(30):
            diameter = int(rng.integers(_HEAD_DIAMETER_RANGE[0], _HEAD_DIAMETER_RANGE[1] + 1))
            radius = diameter / 2
            x0 = int(rng.integers(1, width - diameter - 1))
            y0 = int(rng.integers(1, height - diameter - 8))
            head = np.array([x0, y0, x0 + diameter, y0 + diameter], dtype=np.float64)
            body_w, body_h = 1.2 * diameter, 1.6 * diameter
            cx = x0 + radius
            body = np.array(
                [cx - body_w / 2, y0 + diameter - 1, cx + body_w / 2, y0 + diameter + body_h]
            )
            if not _overlaps(head, occupied) and not _overlaps(body, occupied[0::2], margin=0.0):
                break
        else:
            continue
        persons.append(
            {
                "cx": cx,
                "cy": y0 + radius,
                "radius": radius,
                "head_box": [x0, y0, diameter, diameter],
                "body_box": body,
                "body_colour": [
                    float(v) for v in rng.uniform(70, 190) * np.ones(3) + rng.uniform(-10, 10, 3)
                ],
                "colour": list(HEAD_COLOURS)[int(rng.integers(0, len(HEAD_COLOURS)))],
                "mouth": MOUTHS[int(rng.integers(0, len(MOUTHS)))],
            }
        )
        occupied.extend([head, body])

    context: Context = {"scene": scene, "persons": persons, "gift": False, "fire": False}
    for kind in ("gift", "fire", "ball", "ball"):
        if kind != "ball" and rng.uniform() >= _OBJECT_PROB:
            continue
        if kind == "ball" and rng.uniform() >= 0.5:
            continue
        for _attempt in range(30):
            size = int(rng.integers(13, 20))
            x0, y0 = int(rng.integers(1, width - size - 1)), int(rng.integers(1, height - size - 1))
            box = np.array([x0, y0, x0 + size, y0 + size], dtype=np.float64)
            if not _overlaps(box, occupied):
                break
        else:
            continue
        occupied.append(box)
        if kind == "gift":
            cv2.rectangle(image, (x0, y0), (x0 + size, y0 + size), (245, 245, 245), -1)
            mid_x, mid_y = x0 + size // 2, y0 + size // 2
            cv2.line(image, (mid_x, y0), (mid_x, y0 + size), (10, 10, 10), 2)
            cv2.line(image, (x0, mid_y), (x0 + size, mid_y), (10, 10, 10), 2)
        elif kind == "fire":
            points = np.array(
                [[x0 + size / 2, y0], [x0 + size, y0 + size], [x0, y0 + size]], np.int32
            )
            cv2.fillPoly(image, [points], (255, 120, 0), cv2.LINE_AA)
        else:
            grey = float(rng.uniform(90, 170))
            cv2.circle(
                image,
                (x0 + size // 2, y0 + size // 2),
                size // 2,
                (grey, grey, grey),
                -1,
                cv2.LINE_AA,
            )
        if kind in ("gift", "fire"):
            context[kind] = True

    # Draw persons last, in order of their head's top edge, so that no body covers a head.
    for person in sorted(persons, key=lambda p: p["cy"]):
        _draw_person(image, person)
    image = image + rng.normal(0, rng.uniform(3, 8), size=image.shape)
    annotations = [
        {"head_box": person["head_box"], "emotions": person_emotions(person, context)}
        for person in persons
    ]
    return np.clip(np.round(image), 0, 255).astype(np.uint8), annotations


def _write_split(folder: str, split: str, num_images: int, seed: int) -> None:
    image_dir = os.path.join(folder, "images", "synthetic", "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, persons = _make_image((seed, SYNTHETIC_EMOTIONS_SPLITS[split][1], index))
        name = f"{split}_{index:06d}.png"
        if not cv2.imwrite(os.path.join(image_dir, name), image[:, :, ::-1]):
            raise OSError(f"cannot write {os.path.join(image_dir, name)}")
        image_id = index + 1  # EMOTIC's image ids start at 1, its annotation ids at 0
        images.append(
            {
                "id": image_id,
                "file_name": f"synthetic/images/{name}",
                "height": image.shape[0],
                "width": image.shape[1],
            }
        )
        for person in persons:
            x, y, w, h = person["head_box"]
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": image_id,
                    "category_id": encode_emotions(person["emotions"]),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x, y + h, x + w, y + h]],
                }
            )
    content = {
        "info": f"deformable_family synthetic {SYNTHETIC_EMOTIONS_VERSION} {split}, seed {seed}",
        "license": ["none"],
        "images": images,
        "annotations": annotations,
        "categories": [],
    }
    annotation_dir = os.path.join(folder, "annotations")
    os.makedirs(annotation_dir, exist_ok=True)
    with open(os.path.join(annotation_dir, f"emotic_{split}_bi.json"), "w") as f:
        json.dump(content, f)


def generate_synthetic_emotions(
    root: str, num_images: Optional[Dict[str, int]] = None, seed: int = 0
) -> str:
    """Generate the dataset into ``root`` unless a complete copy is already there.

    Args:
        root: the dataset folder; it appears only once complete.
        num_images: images per split, default ``{"train": 2000, "val": 250}``.
        seed: base seed; image i of a split is drawn from ``(seed, split offset, i)``.

    Returns:
        ``root``.
    """
    num_images = dict(
        num_images or {split: n for split, (n, _) in SYNTHETIC_EMOTIONS_SPLITS.items()}
    )
    for split, n in num_images.items():
        if split not in SYNTHETIC_EMOTIONS_SPLITS:
            raise ValueError(
                f"generate_synthetic_emotions: unknown split {split!r}; expected one of "
                f"{sorted(SYNTHETIC_EMOTIONS_SPLITS)}"
            )
        if not isinstance(n, int) or n < 1:
            raise ValueError(
                f"generate_synthetic_emotions: num_images[{split!r}] must be a positive int, got {n!r}"
            )
    if os.path.isdir(root):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    logger.info(
        f"Generating the synthetic emotion dataset into {root} ({num_images}, seed {seed}) ..."
    )
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        for split, n in num_images.items():
            _write_split(tmp, split, n, seed)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process (e.g. another rank) finished first; its copy is identical.
            if not os.path.isdir(root):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def register_synthetic_emotions(
    prefix: str = "emotic_synthetic",
    root: Optional[str] = None,
    num_images: Optional[Dict[str, int]] = None,
    seed: int = 0,
) -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` (or the splits of ``num_images``) with
    EMOTIC's loader and metadata; nothing is generated until a split is first requested.

    Returns:
        The registered dataset names.
    """
    root = root or default_synthetic_emotions_root()
    num_images = dict(
        num_images or {split: n for split, (n, _) in SYNTHETIC_EMOTIONS_SPLITS.items()}
    )
    names = []
    for split in num_images:
        name = f"{prefix}_{split}"
        json_file = os.path.join(root, "annotations", f"emotic_{split}_bi.json")
        image_root = os.path.join(root, "images")

        def load(json_file=json_file, image_root=image_root, name=name):
            generate_synthetic_emotions(root, num_images, seed)
            return load_emotic_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(**emotic_metadata(json_file, image_root))
        names.append(name)
    return names
