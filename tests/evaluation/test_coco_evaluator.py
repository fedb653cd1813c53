"""build_coco_evaluator on the synthetic val split: ground truth as predictions gives AP 100."""
import inspect
import json
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode, Boxes, Instances

from deformable_family.data import register_shapes
from deformable_family.evaluation import build_coco_evaluator

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def val_name(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "shapes_v1")
    # The json of a lazily generated dataset does not exist yet: the evaluator must cope.
    return register_shapes("shapes_evaltest", root=root, num_images={"val": 12}, seed=0)[0]


def _predictions(record, shift=0.0):
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
    instances = Instances((record["height"], record["width"]))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) + shift)
    instances.scores = torch.ones(len(boxes))
    instances.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]], dtype=torch.int64)
    return {"instances": instances}


def _evaluate(name, shift):
    evaluator = build_coco_evaluator(name, distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        evaluator.process([{"image_id": record["image_id"]}], [_predictions(record, shift)])
    return evaluator.evaluate()["bbox"]


def test_ground_truth_as_predictions_gives_ap_100(val_name):
    results = _evaluate(val_name, shift=0.0)
    for key in ("AP", "AP50", "AP75"):
        assert results[key] == pytest.approx(100.0)
    for name in MetadataCatalog.get(val_name).thing_classes:
        assert results[f"AP-{name}"] == pytest.approx(100.0)


def test_shifted_boxes_lower_ap(val_name):
    """The same predictions moved by 6 px: the evaluator does see box errors."""
    results = _evaluate(val_name, shift=6.0)
    assert results["AP"] < 90.0
    assert results["AP50"] > results["AP75"]


def test_empty_dataset_name_is_rejected():
    with pytest.raises(ValueError, match="dataset_name"):
        build_coco_evaluator("")


def _configured_evaluator(val_name, output_dir, *overrides):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "quickstart", "deformable_detr_shapes.py"))
    cfg = LazyConfig.apply_overrides(
        cfg, [f"dataloader.test.dataset.names={val_name}", f"train.output_dir={output_dir}", *overrides]
    )
    return instantiate(cfg.dataloader.evaluator)


def test_configured_evaluator_writes_predictions_into_the_output_dir(val_name, tmp_path):
    evaluator = _configured_evaluator(val_name, str(tmp_path))
    evaluator.reset()
    for record in DatasetCatalog.get(val_name):
        evaluator.process([{"image_id": record["image_id"]}], [_predictions(record)])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
    written = tmp_path / "inference" / "coco_instances_results.json"
    assert written.exists() and len(json.loads(written.read_text())) > 0


def test_configured_max_detections_follow_the_model(val_name, tmp_path):
    if "max_dets_per_image" in inspect.signature(COCOEvaluator.__init__).parameters:
        evaluator = _configured_evaluator(val_name, str(tmp_path), "model.select_topk=300")
        assert evaluator._max_dets_per_image[-1] == 300
    else:  # detectron2 v0.6 evaluates 100 per image: a model keeping 300 is refused, not cut silently
        with pytest.raises(ValueError, match="max_dets_per_image=300"):
            _configured_evaluator(val_name, str(tmp_path), "model.select_topk=300")
    _configured_evaluator(val_name, str(tmp_path), "model.select_topk=100")
