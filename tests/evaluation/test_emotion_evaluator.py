"""EmoticEvaluator / CAEREvaluator against hand-computed values (the authors' test.py protocol)."""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from deformable_family.evaluation import (
    CAEREvaluator,
    EmoticEvaluator,
    match_persons_to_queries,
)
import deformable_family.evaluation.emotion_evaluation as emotion_evaluation


def _register(name, records, classes):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(emotion_classes=classes)


def _person(xywh, emotions):
    return {"bbox": xywh, "bbox_mode": 1, "category_id": 0, "emotions": emotions, "iscrowd": 0}


# Image 1: three persons. a and b overlap queries 0 and 1 equally (identical boxes): the tie goes to
# query 1, which both share; c overlaps no query and gets the last one (2). Image 2: one person on
# query 2. The third emotion has no positive.
RECORDS = [
    {
        "image_id": 2,
        "file_name": "two.png",
        "height": 200,
        "width": 200,
        "annotations": [_person([100, 100, 10, 10], [0, 0, 0])],
    },
    {
        "image_id": 1,
        "file_name": "one.png",
        "height": 200,
        "width": 200,
        "annotations": [
            _person([0, 0, 9, 9], [1, 0, 0]),
            _person([2, 2, 9, 9], [0, 1, 0]),
            _person([50, 50, 5, 5], [1, 1, 0]),
        ],
    },
]
QUERY_BOXES = {
    1: [[0, 0, 9, 9], [0, 0, 9, 9], [100, 100, 109, 109]],
    2: [[0, 0, 9, 9], [0, 0, 9, 9], [100, 100, 109, 109]],
}
QUERY_SCORES = {
    1: [[0.9, 0.9, 0.9], [0.8, 0.1, 0.3], [0.2, 0.7, 0.5]],
    2: [[0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [0.6, 0.4, 0.2]],
}


def _outputs(image_id):
    instances = Instances((200, 200))
    instances.pred_boxes = Boxes(torch.tensor(QUERY_BOXES[image_id], dtype=torch.float32))
    instances.emotion_scores = torch.tensor(QUERY_SCORES[image_id])
    return [{"instances": instances}]


def test_matching_ties_to_the_highest_query_and_no_overlap_to_the_last():
    persons = np.array([[0, 0, 9, 9], [2, 2, 11, 11], [50, 50, 55, 55]], dtype=float)
    assert match_persons_to_queries(persons, np.array(QUERY_BOXES[1], dtype=float)).tolist() == [
        1,
        1,
        2,
    ]
    # +1-pixel IoU: person [0, 0, 4, 4] vs a zero-width query [0, 0, 0, 4] is 5/25 = 0.2 and vs
    # [3, 3, 8, 8] 4/57 = 0.07, so query 0; the plain IoU (0 and 1/40) would pick query 1.
    assert match_persons_to_queries(
        np.array([[0, 0, 4, 4]]), np.array([[0, 0, 0, 4], [3, 3, 8, 8]])
    ).tolist() == [0]


def test_emotic_mAP_by_hand():
    _register("emotion_eval_by_hand", RECORDS, ["A", "B", "C"])
    evaluator = EmoticEvaluator("emotion_eval_by_hand", distributed=False)
    evaluator.reset()
    for image_id in (2, 1):
        evaluator.process([{"image_id": image_id}], _outputs(image_id))
    results = evaluator.evaluate()["emotic"]
    # Persons in image-id order: a (q1: .8 .1 .3), b (q1), c (q2: .2 .7 .5), then d (image 2, q2:
    # .6 .4 .2). Emotion A: scores .8 .8 .2 .6, labels 1 0 1 0 -> AP = .5 * .5 + .5 * .5 = .5.
    # Emotion B: scores .1 .1 .7 .4, labels 0 1 1 0 -> AP = .5 * 1 + .5 * .5 = .75. C: no positive, 0.
    assert results["AP-A"] == pytest.approx(50.0)
    assert results["AP-B"] == pytest.approx(75.0)
    assert results["AP-C"] == pytest.approx(0.0)
    assert results["mAP"] == pytest.approx(100 * (0.5 + 0.75 + 0.0) / 3)
    # Image 1 alone (3 persons): A .8 .8 .2 / 1 0 1 -> .25 + .5 * 2/3; B .1 .1 .7 / 0 1 1 -> .5 + .5 * 2/3.
    assert results["mAP-persons=3"] == pytest.approx(100 * ((0.25 + 1 / 3) + (0.5 + 1 / 3)) / 3)
    assert results["mAP-persons=1"] == pytest.approx(0.0)  # its only person has no positive
    assert "mAP-persons=2" not in results and "mAP-persons>=5" not in results
    # Chance level: a constant score's AP is the positive rate: (2/4 + 2/4 + 0) / 3.
    assert results["mAP-chance"] == pytest.approx(100 / 3)


def test_missing_prediction_and_gathering(monkeypatch):
    _register("emotion_eval_gather", RECORDS, ["A", "B", "C"])
    evaluator = EmoticEvaluator("emotion_eval_gather", distributed=False)
    evaluator.process([{"image_id": 1}], _outputs(1))
    with pytest.raises(ValueError, match=r"no prediction for image_id 2 \(two.png\)"):
        evaluator.evaluate()
    # Distributed: each process holds some images; the main process merges and computes, the
    # others return {}.
    other = {2: (np.array(QUERY_BOXES[2], dtype=float), np.array(QUERY_SCORES[2]))}
    distributed = EmoticEvaluator("emotion_eval_gather", distributed=True)
    distributed.process([{"image_id": 1}], _outputs(1))
    monkeypatch.setattr(emotion_evaluation.comm, "synchronize", lambda: None)
    monkeypatch.setattr(emotion_evaluation.comm, "gather", lambda data, dst=0: [data, other])
    monkeypatch.setattr(emotion_evaluation.comm, "is_main_process", lambda: True)
    assert distributed.evaluate()["emotic"]["mAP"] == pytest.approx(100 * 1.25 / 3)
    monkeypatch.setattr(emotion_evaluation.comm, "is_main_process", lambda: False)
    assert distributed.evaluate() == {}


def test_caer_accuracy_by_hand():
    records = [
        {
            "image_id": 1,
            "file_name": "a.png",
            "annotations": [_person([0, 0, 9, 9], [0, 1, 0]), _person([100, 100, 9, 9], [0, 0, 1])],
        },
        {"image_id": 2, "file_name": "b.png", "annotations": [_person([0, 0, 9, 9], [1, 0, 0])]},
    ]
    _register("caer_eval_by_hand", records, ["x", "y", "z"])
    evaluator = CAEREvaluator("caer_eval_by_hand", distributed=False)
    for image_id, scores in (
        (1, [[0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.7, 0.2, 0.1]]),
        (2, [[0.2, 0.5, 0.3], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]),
    ):
        instances = Instances((200, 200))
        instances.pred_boxes = Boxes(
            torch.tensor([[0.0, 0, 9, 9], [50, 50, 60, 60], [100, 100, 109, 109]])
        )
        instances.emotion_scores = torch.tensor(scores)
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    results = evaluator.evaluate()["caer_s"]
    # Face 1 -> query 0 -> y (right); face 2 -> query 2 -> x (wrong, z); face 3 -> query 0 -> y (wrong, x).
    assert results["accuracy"] == pytest.approx(100 / 3)
    assert results["accuracy-y"] == pytest.approx(100.0) and results["accuracy-z"] == pytest.approx(
        0.0
    )
