"""The synthetic shapes dataset: deterministic, atomic, registered with COCO metadata."""
import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from deformable_family.data import SHAPES_CLASSES, generate_shapes, register_shapes
from deformable_family.data import shapes as shapes_module

SMALL = {"train": 6, "val": 3}


def test_generation_is_deterministic(tmp_path):
    first = generate_shapes(str(tmp_path / "a"), SMALL, seed=5)
    second = generate_shapes(str(tmp_path / "b"), SMALL, seed=5)
    other = generate_shapes(str(tmp_path / "c"), SMALL, seed=6)
    for split in SMALL:
        a = json.load(open(os.path.join(first, f"{split}.json")))
        b = json.load(open(os.path.join(second, f"{split}.json")))
        a.pop("info"), b.pop("info")
        assert a == b
        with open(os.path.join(first, split, "000000.png"), "rb") as f1, open(os.path.join(second, split, "000000.png"), "rb") as f2:
            assert f1.read() == f2.read()
    assert json.load(open(os.path.join(other, "train.json")))["annotations"] != json.load(
        open(os.path.join(first, "train.json"))
    )["annotations"]


def test_content_is_varied(tmp_path):
    root = generate_shapes(str(tmp_path / "s"), {"train": 40}, seed=0)
    coco = json.load(open(os.path.join(root, "train.json")))
    assert {c["name"] for c in coco["categories"]} == set(SHAPES_CLASSES)
    assert {a["category_id"] for a in coco["annotations"]} == set(range(1, len(SHAPES_CLASSES) + 1))
    sizes = [max(a["bbox"][2:]) for a in coco["annotations"]]
    aspects = [a["bbox"][2] / a["bbox"][3] for a in coco["annotations"]]
    assert min(sizes) < 25 and max(sizes) > 40 and min(min(a['bbox'][2:]) for a in coco['annotations']) >= 16 / 1.5 ** 0.5 - 0.01
    assert min(aspects) < 0.8 and max(aspects) > 1.25
    for image in coco["images"]:
        assert 112 <= image["height"] <= 144 and 112 <= image["width"] <= 144
    for a in coco["annotations"]:
        image = coco["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"] and w > 0 and h > 0


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write_split(folder, split, num_images, seed):
        calls.append(split)
        os.makedirs(os.path.join(folder, split))
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(shapes_module, "_write_split", failing_write_split)
    root = tmp_path / "shapes_v1"
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(str(root), SMALL)
    assert calls and not root.exists()
    assert os.listdir(tmp_path) == []  # no temporary folder left behind
    monkeypatch.undo()
    generate_shapes(str(root), SMALL)
    assert sorted(os.listdir(root)) == ["params.json", "train", "train.json", "val", "val.json"]


def test_existing_folder_is_reused_only_with_the_same_parameters(tmp_path):
    root = str(tmp_path / "shapes_v1")
    generate_shapes(root, SMALL, seed=3)
    with open(os.path.join(root, "params.json")) as f:
        assert json.load(f) == {"version": "shapes_v1", "num_images": SMALL, "seed": 3}
    marker = os.path.join(root, "val", "marker")
    open(marker, "w").close()
    assert generate_shapes(root, SMALL, seed=3) == root
    assert os.path.exists(marker)  # reused as it is, not regenerated
    with pytest.raises(ValueError, match=r"generated with .*'seed': 3.*not the requested .*'seed': 4"):
        generate_shapes(root, SMALL, seed=4)
    with pytest.raises(ValueError, match=r"'val': 3.*not the requested .*'val': 5"):
        generate_shapes(root, {"train": 6, "val": 5}, seed=3)
    os.remove(os.path.join(root, "params.json"))  # a copy from an earlier version
    with pytest.raises(ValueError, match="has no params.json"):
        generate_shapes(root, SMALL, seed=3)
    assert os.path.exists(marker)  # refused, never deleted


def test_registration_generates_on_first_use(tmp_path):
    root = str(tmp_path / "shapes_v1")
    names = register_shapes("shapes_regtest", root=root, num_images=SMALL, seed=0)
    assert names == ["shapes_regtest_train", "shapes_regtest_val"]
    assert not os.path.exists(root)  # nothing generated at registration
    dicts = DatasetCatalog.get("shapes_regtest_val")
    assert len(dicts) == SMALL["val"] and os.path.exists(root)
    assert all(0 <= a["category_id"] < len(SHAPES_CLASSES) for d in dicts for a in d["annotations"])
    metadata = MetadataCatalog.get("shapes_regtest_val")
    assert metadata.thing_classes == SHAPES_CLASSES
    assert metadata.json_file == os.path.join(root, "val.json")


def test_builtin_splits_are_registered():
    assert "shapes_train" in DatasetCatalog.list() and "shapes_val" in DatasetCatalog.list()


def test_bad_split_is_named(tmp_path):
    with pytest.raises(ValueError, match="test"):
        generate_shapes(str(tmp_path / "x"), {"test": 3})
