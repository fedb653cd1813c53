"""EMOTIC / CAER-S registration and loading, the emotions through the DETR mapper, and the synthetic
emotion dataset."""

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T

import deformable_family.data  # noqa: F401  (registers the builtin names)
from deformable_family.data import (
    EMOTIC_EMOTIONS,
    DetrDatasetMapper,
    decode_emotions,
    encode_emotions,
    load_caer_json,
    load_emotic_json,
    register_emotic,
)
from deformable_family.data.synthetic_emotions import EMOTION_RULES, _make_image


def test_label_integer_decoding_affection_is_the_most_significant_bit():
    assert decode_emotions(1 << 25) == [1] + [0] * 25  # Affection
    assert decode_emotions(1) == [0] * 25 + [1]  # Yearning
    assert EMOTIC_EMOTIONS[0] == "Affection" and EMOTIC_EMOTIONS[-1] == "Yearning"
    # The authors' decoding: bin() left-padded to 26 digits.
    for value in (37773888, 33575488, 5, 2**26 - 1, 0):
        expected = [int(c) for c in bin(value)[2:].rjust(26, "0")]
        assert decode_emotions(value) == expected
        assert encode_emotions(expected) == value
    for bad in (-1, 2**26, 1.5, True):
        with pytest.raises(ValueError):
            decode_emotions(bad)


def _write_emotic(tmp_path, annotations, images=None):
    images = images or [
        {"id": 2, "file_name": "mscoco/images/b.jpg", "width": 100, "height": 80},
        {"id": 1, "file_name": "mscoco/images/a.jpg", "width": 60, "height": 50},
    ]
    path = tmp_path / "emotic_val_bi.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return str(path)


def test_load_emotic_json_sorts_images_decodes_labels_and_counts_drops(tmp_path, caplog):
    annotations = [
        {"id": 0, "image_id": 2, "bbox": [10, 10, 20, 30], "category_id": (1 << 25) | 1},
        {"id": 1, "image_id": 2, "bbox": [10, 10, 0, 30], "category_id": 4},  # empty box
        {"id": 2, "image_id": 1, "bbox": [70, 10, 5, 5], "category_id": 4},  # outside the image
        {
            "id": 3,
            "image_id": 1,
            "bbox": [50, 40, 20, 20],
            "category_id": 2,
        },  # partly outside: kept
    ]
    json_file = _write_emotic(tmp_path, annotations)
    with caplog.at_level(logging.INFO, logger="deformable_family.data.emotic"):
        dicts = load_emotic_json(json_file, "/root/images")
    assert [d["image_id"] for d in dicts] == [1, 2]
    assert dicts[1]["file_name"] == "/root/images/mscoco/images/b.jpg"
    assert (dicts[1]["height"], dicts[1]["width"]) == (80, 100)
    person = dicts[1]["annotations"][0]
    assert person["bbox"] == [10.0, 10.0, 20.0, 30.0] and person["category_id"] == 0
    assert person["emotions"] == [1] + [0] * 24 + [1]
    assert len(dicts[0]["annotations"]) == 1 and dicts[0]["annotations"][0]["emotions"][24] == 1
    assert "dropped 2 persons" in caplog.text


@pytest.mark.parametrize(
    "annotation, message",
    [
        (
            {"id": 7, "image_id": 1, "bbox": [1, 1, 5, 5]},
            r"annotations\[0\] \(id 7\): missing field 'category_id'",
        ),
        (
            {"id": 7, "image_id": 1, "bbox": [1, 1, 5, 5], "category_id": 2**26},
            r"annotations\[0\] \(id 7\): category_id 67108864 is outside",
        ),
        (
            {"id": 7, "image_id": 9, "bbox": [1, 1, 5, 5], "category_id": 1},
            r"annotations\[0\] \(id 7\): image_id 9 is not in 'images'",
        ),
        (
            {"id": 7, "image_id": 1, "bbox": [1, 1, 5], "category_id": 1},
            r"annotations\[0\] \(id 7\): bbox must be",
        ),
    ],
)
def test_bad_emotic_entries_name_the_file_and_entry(tmp_path, annotation, message):
    json_file = _write_emotic(tmp_path, [annotation])
    with pytest.raises(ValueError, match=message) as error:
        load_emotic_json(json_file, "images")
    assert json_file in str(error.value)


def test_bad_emotic_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_emotic_json(str(tmp_path / "missing.json"), "images")
    path = tmp_path / "no_images.json"
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"no_images.json: top level: missing field 'images'"):
        load_emotic_json(str(path), "images")
    json_file = _write_emotic(tmp_path, [], images=[{"id": 3, "file_name": "x.jpg", "width": 5}])
    with pytest.raises(ValueError, match=r"images\[0\] \(id 3\): missing field 'height'"):
        load_emotic_json(json_file, "images")


def test_caer_s_one_hot_and_bad_class(tmp_path):
    path = tmp_path / "caer_test.json"
    images = [{"id": 1, "file_name": "Sad/0001.png", "width": 40, "height": 30}]
    good = [{"id": 0, "image_id": 1, "bbox": [1, 2, 10, 10], "category_id": 5}]
    path.write_text(json.dumps({"images": images, "annotations": good, "categories": []}))
    (record,) = load_caer_json(str(path), "CAER_S/test")
    assert record["annotations"][0]["emotions"] == [0, 0, 0, 0, 0, 1, 0]
    bad = [{"id": 4, "image_id": 1, "bbox": [1, 2, 10, 10], "category_id": 7}]
    path.write_text(json.dumps({"images": images, "annotations": bad, "categories": []}))
    with pytest.raises(
        ValueError,
        match=r"caer_test.json: annotations\[0\] \(id 4\): category_id 7 is outside \[0, 7\)",
    ):
        load_caer_json(str(path), "CAER_S/test")


def test_builtin_names_live_under_detectron2_datasets():
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    for split in ("train", "val", "test"):
        meta = MetadataCatalog.get(f"emotic_{split}")
        assert meta.json_file == os.path.join(
            root, "emotic", "annotations", f"emotic_{split}_bi.json"
        )
        assert meta.image_root == os.path.join(root, "emotic", "images")
        assert meta.emotion_classes == EMOTIC_EMOTIONS
        caer = MetadataCatalog.get(f"caer_s_{split}")
        assert caer.json_file == os.path.join(root, "CAER_S", "annotations", f"caer_{split}.json")
        assert caer.image_root == os.path.join(
            root, "CAER_S", "test" if split == "test" else "train"
        )
    assert "emotic_synthetic_train" in DatasetCatalog.list()


def _mapper_input(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    file_name = str(tmp_path / "image.png")
    cv2.imwrite(file_name, image)
    emotions = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    boxes = [[2, 2, 10, 10], [20, 5, 10, 10], [48, 25, 10, 10]]  # xywh; the third sits bottom right
    annotations = [
        {"bbox": box, "bbox_mode": 1, "category_id": 0, "emotions": emotion, "iscrowd": 0}
        for box, emotion in zip(boxes, emotions)
    ]
    return {
        "file_name": file_name,
        "height": 40,
        "width": 60,
        "image_id": 1,
        "annotations": annotations,
    }


def test_mapper_keeps_emotions_with_their_boxes_through_flip_and_crop(tmp_path):
    record = _mapper_input(tmp_path)
    # Flip (x -> 60 - x), then crop x in [0, 40), y in [0, 40): the third person (flipped to x 2..12)
    # stays, the first (flipped to x 48..58) leaves the crop and is dropped with its emotions.
    mapper = DetrDatasetMapper(
        True,
        [T.RandomFlip(prob=1.0, horizontal=True), T.CropTransform(0, 0, 40, 40)],
        extra_annotation_fields=["emotions"],
    )
    instances = mapper(record)["instances"]
    boxes = instances.gt_boxes.tensor.tolist()
    assert boxes == [[30.0, 5.0, 40.0, 15.0], [2.0, 25.0, 12.0, 35.0]]
    assert instances.gt_emotions.tolist() == [[0, 1, 0], [0, 0, 1]]
    # A resize scales the boxes and leaves the emotions untouched.
    resized = DetrDatasetMapper(True, [T.Resize((80, 120))], extra_annotation_fields=["emotions"])(
        record
    )
    assert resized["instances"].gt_emotions.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert resized["instances"].gt_boxes.tensor[1].tolist() == [40.0, 10.0, 60.0, 30.0]


def test_mapper_errors_name_the_file(tmp_path):
    record = _mapper_input(tmp_path)
    del record["annotations"][1]["emotions"]
    mapper = DetrDatasetMapper(True, [], extra_annotation_fields=["emotions"])
    with pytest.raises(ValueError, match=r"annotation 1 of .*image.png has no 'emotions'"):
        mapper(record)
    record = _mapper_input(tmp_path)
    record["file_name"] = str(tmp_path / "mscoco" / "images" / "gone.jpg")
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        mapper(record)


def test_synthetic_labels_follow_their_rules():
    kinds = [kind for kind, _ in EMOTION_RULES.values()]
    assert (
        kinds.count("appearance") == 11 and kinds.count("scene") == 7 and kinds.count("others") == 8
    )
    image, persons = _make_image((0, 1, 3))
    assert image.dtype == np.uint8 and image.ndim == 3
    for person in persons:
        x, y, w, h = person["head_box"]
        assert w == h and 0 <= x and x + w <= image.shape[1] and y + h <= image.shape[0]
        assert len(person["emotions"]) == 26
        # Disconnection (alone) and Engagement (exactly two) follow the number of persons.
        assert person["emotions"][7] == int(len(persons) == 1)
        assert person["emotions"][11] == int(len(persons) == 2)


def test_synthetic_dataset_is_written_in_emotic_format(tmp_path):
    from deformable_family.data import generate_synthetic_emotions

    root = generate_synthetic_emotions(str(tmp_path / "synthetic"), {"train": 3, "val": 2}, seed=5)
    dicts = load_emotic_json(
        os.path.join(root, "annotations", "emotic_val_bi.json"), os.path.join(root, "images")
    )
    assert [d["image_id"] for d in dicts] == [1, 2]
    for record in dicts:
        assert os.path.isfile(record["file_name"])
        assert record["file_name"].endswith(".png") and "/synthetic/images/" in record["file_name"]
        assert all(len(a["emotions"]) == 26 for a in record["annotations"])
    with open(os.path.join(root, "annotations", "emotic_val_bi.json")) as f:
        content = json.load(f)
    assert content["categories"] == [] and content["annotations"][0]["id"] == 0
    assert all(isinstance(a["category_id"], int) for a in content["annotations"])
