"""load_dataset_dicts: degenerate boxes dropped and counted, empty images, class histogram."""
import logging
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from deformable_family.data import drop_degenerate_boxes, load_dataset_dicts


def _ann(bbox, category=0, mode=BoxMode.XYWH_ABS):
    return {"bbox": bbox, "bbox_mode": mode, "category_id": category, "iscrowd": 0}


def _register(records, classes=("a", "b")):
    name = f"test_dicts_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return name


RECORDS = [
    {"file_name": "0.png", "height": 100, "width": 100, "annotations": [
        _ann([10, 10, 20, 20], 0),
        _ann([10, 10, 0, 20], 1),  # zero width
        _ann([50, 50, -5, 10], 1),  # negative width
    ]},
    {"file_name": "1.png", "height": 100, "width": 100, "annotations": [
        _ann([120, 10, 20, 20], 0),  # entirely right of the image
        _ann([90, 90, 30, 30], 1),  # partly outside: kept
        _ann([5, 5, 5, 5], 1, BoxMode.XYXY_ABS),  # xyxy with zero size
    ]},
    {"file_name": "2.png", "height": 100, "width": 100, "annotations": [_ann([0, 0, float("nan"), 3], 0)]},
    {"file_name": "3.png", "height": 100, "width": 100, "annotations": []},
]


def test_degenerate_boxes_are_dropped_and_counted(caplog):
    name = _register(RECORDS)
    with caplog.at_level(logging.INFO, logger="deformable_family"):
        dicts = load_dataset_dicts(name)
    assert [len(d["annotations"]) for d in dicts] == [1, 1, 0, 0]
    assert dicts[1]["annotations"][0]["bbox"] == [90, 90, 30, 30]
    assert "Dropped 5 degenerate boxes" in caplog.text
    # The class histogram is logged with the kept instances.
    assert "| a" in caplog.text and "| total" in caplog.text
    # The registered records themselves are not modified.
    assert len(RECORDS[0]["annotations"]) == 3


def test_filter_empty_removes_images_without_annotations():
    name = _register(RECORDS)
    dicts = load_dataset_dicts([name], filter_empty=True)
    assert [d["file_name"] for d in dicts] == ["0.png", "1.png"]


def test_drop_degenerate_boxes_without_image_size_keeps_far_boxes():
    records = [{"file_name": "x.png", "annotations": [_ann([500, 500, 10, 10]), _ann([0, 0, 0, 1])]}]
    kept, dropped = drop_degenerate_boxes(records)
    assert dropped == 1 and len(kept[0]["annotations"]) == 1


def test_unknown_dataset_is_named():
    with pytest.raises(KeyError, match="no_such_dataset"):
        load_dataset_dicts("no_such_dataset")


def test_bad_category_is_named():
    name = _register([{"file_name": "bad.png", "height": 10, "width": 10, "annotations": [_ann([1, 1, 2, 2], 7)]}])
    with pytest.raises(ValueError, match="bad.png"):
        load_dataset_dicts(name)
