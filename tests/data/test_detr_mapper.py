"""DetrDatasetMapper and RandomSelect: sizes, the crop branch's frequency, box consistency."""
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from deformable_family.data import DetrDatasetMapper, RandomSelect

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
COCO_DATA_CONFIG = os.path.join(ROOT, "configs", "common", "data", "coco_detr.py")
MULTI_SCALE = list(range(480, 801, 32))


def _coco_augmentations(is_train=True):
    cfg = LazyConfig.load(COCO_DATA_CONFIG)
    loader = cfg.dataloader.train if is_train else cfg.dataloader.test
    return list(instantiate(loader.mapper.augmentations))


@pytest.fixture
def white_box_image(tmp_path):
    """A 150 x 200 black RGB image with one white rectangle (x 40-100, y 30-90) and its record."""
    image = np.zeros((150, 200, 3), np.uint8)
    image[30:90, 40:100] = 255
    path = str(tmp_path / "image.png")
    cv2.imwrite(path, image)
    record = {
        "file_name": path,
        "height": 150,
        "width": 200,
        "image_id": 1,
        "annotations": [{"bbox": [40, 30, 60, 60], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "iscrowd": 0}],
    }
    return record


def _crop_was_applied(transforms: T.TransformList) -> bool:
    return any(isinstance(t, T.CropTransform) for t in transforms.transforms)


def test_train_sizes_follow_the_recipe(white_box_image):
    np.random.seed(0)
    mapper = DetrDatasetMapper(is_train=True, augmentations=_coco_augmentations())
    for _ in range(20):
        out = mapper(white_box_image)
        height, width = out["image"].shape[1:]
        assert min(height, width) in MULTI_SCALE
        assert max(height, width) <= 1333


def test_test_size_is_800(white_box_image):
    mapper = DetrDatasetMapper(is_train=False, augmentations=_coco_augmentations(is_train=False))
    out = mapper(white_box_image)
    assert min(out["image"].shape[1:]) == 800
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (150, 200)


def test_crop_branch_is_chosen_about_half_the_time():
    np.random.seed(0)
    augmentations = T.AugmentationList(_coco_augmentations())
    image = np.zeros((150, 200, 3), np.uint8)
    draws = 400
    crops = sum(_crop_was_applied(augmentations(T.AugInput(image.copy()))) for _ in range(draws))
    # Binomial(400, 0.5) has std 10: [160, 240] is +-4 std.
    assert 160 <= crops <= 240, crops


def test_random_select_is_deterministic_under_a_seed():
    select = RandomSelect(T.ResizeShortestEdge([10, 20, 30, 40], sample_style="choice"), T.NoOpTransform(), prob=0.5)
    image = np.zeros((50, 60, 3), np.uint8)

    np.random.seed(3)
    first = [repr(select(T.AugInput(image.copy()))) for _ in range(10)]
    np.random.seed(3)
    second = [repr(select(T.AugInput(image.copy()))) for _ in range(10)]
    assert first == second
    assert len(set(first)) > 1  # not constant


def test_random_select_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prob"):
        RandomSelect(T.NoOpTransform(), T.NoOpTransform(), prob=1.5)
    with pytest.raises(TypeError, match="first"):
        RandomSelect("resize", T.NoOpTransform())


def test_boxes_stay_on_the_object_after_flip_and_crop(white_box_image):
    """Every mapped box is inside the image, has positive area, and covers white pixels only."""
    np.random.seed(1)
    mapper = DetrDatasetMapper(is_train=True, augmentations=_coco_augmentations())
    crops_seen, empty_seen = 0, 0
    for _ in range(40):
        out = mapper(white_box_image)
        image = out["image"]
        height, width = image.shape[1:]
        boxes = out["instances"].gt_boxes.tensor
        assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
        assert torch.all(boxes[:, :2] >= 0) and torch.all(boxes[:, 2] <= width) and torch.all(boxes[:, 3] <= height)
        if len(boxes) == 0:
            empty_seen += 1
            continue
        assert out["instances"].gt_classes.tolist() == [2]
        x0, y0, x1, y1 = boxes[0].round().int().tolist()
        inner = image[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].float()
        assert inner.numel() == 0 or inner.mean() > 200  # the box covers the white rectangle
        # and nothing white lies outside it (2 px margin for resize interpolation).
        outside = image.clone()
        outside[:, max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = 0
        assert outside.float().max() < 128
        crops_seen += int(width != round(height * 200 / 150) and height != round(width * 150 / 200))
    assert crops_seen > 0  # the crop branch was exercised


def test_horizontal_flip_mirrors_the_box(white_box_image):
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.RandomFlip(prob=1.0, horizontal=True)])
    out = mapper(white_box_image)
    assert out["instances"].gt_boxes.tensor.tolist() == [[200 - 100, 30, 200 - 40, 90]]


def test_cropped_out_objects_are_removed_and_the_image_kept(white_box_image):
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.CropTransform(120, 100, 50, 40)])
    out = mapper(white_box_image)
    assert tuple(out["image"].shape) == (3, 40, 50)
    assert len(out["instances"]) == 0


def test_partly_cropped_box_is_clipped(white_box_image):
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.CropTransform(70, 0, 100, 60)])
    out = mapper(white_box_image)
    assert out["instances"].gt_boxes.tensor.tolist() == [[0, 30, 30, 60]]


def test_image_is_rgb(tmp_path):
    image_bgr = np.zeros((8, 8, 3), np.uint8)
    image_bgr[..., 2] = 255  # red in BGR
    path = str(tmp_path / "red.png")
    cv2.imwrite(path, image_bgr)
    out = DetrDatasetMapper(is_train=False, augmentations=[])({"file_name": path, "height": 8, "width": 8})
    assert out["image"][:, 0, 0].tolist() == [255, 0, 0]


def test_missing_image_names_the_file(tmp_path):
    path = str(tmp_path / "does_not_exist.jpg")
    mapper = DetrDatasetMapper(is_train=True, augmentations=[])
    with pytest.raises(FileNotFoundError, match="does_not_exist.jpg"):
        mapper({"file_name": path, "annotations": []})


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not an image")
    mapper = DetrDatasetMapper(is_train=True, augmentations=[])
    with pytest.raises(ValueError, match="broken.png"):
        mapper({"file_name": str(path), "annotations": []})


def test_augmentations_must_be_a_list():
    with pytest.raises(TypeError, match="augmentations"):
        DetrDatasetMapper(is_train=True, augmentations=T.RandomFlip())
