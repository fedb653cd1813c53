"""DetrDatasetMapper and RandomSelect: sizes, the crop branch's frequency, box consistency."""
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from deformable_family.data import DetrDatasetMapper, RandomSelect, read_image_or_fail

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


def test_train_sizes_are_capped_at_max_size(tmp_path):
    """A 1:4 image resized to a short side of 480-800 would be 1920-3200 long: the long side is
    capped at 1333 (the short side then follows the aspect ratio), in both branches of the recipe."""
    path = str(tmp_path / "wide.png")
    cv2.imwrite(path, np.zeros((50, 200, 3), np.uint8))
    record = {"file_name": path, "height": 50, "width": 200, "image_id": 1, "annotations": []}
    np.random.seed(0)
    mapper = DetrDatasetMapper(is_train=True, augmentations=_coco_augmentations())
    capped = 0
    for _ in range(20):
        height, width = mapper(record)["image"].shape[1:]
        assert max(height, width) <= 1333
        if max(height, width) == 1333:
            capped += 1
            assert min(height, width) < 480  # the cap, not the short-side choice, set the size
        else:
            assert min(height, width) in MULTI_SCALE
    assert capped > 0


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


def test_cropped_out_objects_are_removed_counted_and_the_image_kept(white_box_image):
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.CropTransform(120, 100, 50, 40)])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    mapper_logger = logging.getLogger("deformable_family.data.mapper")
    mapper_logger.addHandler(handler)
    level = mapper_logger.level
    mapper_logger.setLevel(logging.INFO)
    try:
        out = mapper(white_box_image)
    finally:
        mapper_logger.removeHandler(handler)
        mapper_logger.setLevel(level)
    assert tuple(out["image"].shape) == (3, 40, 50)
    assert len(out["instances"]) == 0
    assert (mapper.num_boxes_emptied, mapper.num_boxes_seen) == (1, 1)
    assert any("dropped 1 of 1 boxes" in record.getMessage() for record in records)
    # A box the augmentation keeps is counted as seen, not as emptied.
    mapper.augmentations = T.AugmentationList([T.NoOpTransform()])
    assert len(mapper(white_box_image)["instances"]) == 1
    assert (mapper.num_boxes_emptied, mapper.num_boxes_seen) == (1, 2)


def test_is_detectron2_dataset_mapper():
    assert issubclass(DetrDatasetMapper, DatasetMapper)


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


def test_memory_error_is_not_reported_as_an_unreadable_image(tmp_path, monkeypatch):
    path = str(tmp_path / "image.png")
    cv2.imwrite(path, np.zeros((8, 8, 3), np.uint8))

    def out_of_memory(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(detection_utils, "read_image", out_of_memory)
    with pytest.raises(MemoryError, match="simulated"):
        DetrDatasetMapper(is_train=True, augmentations=[])({"file_name": path, "annotations": []})
    with pytest.raises(MemoryError, match="simulated"):
        read_image_or_fail(path, "RGB")


def test_augmentations_must_be_a_list():
    with pytest.raises(TypeError, match="augmentations"):
        DetrDatasetMapper(is_train=True, augmentations=T.RandomFlip())
