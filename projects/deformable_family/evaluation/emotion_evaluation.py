"""Emotion evaluation of DSCT: EMOTIC mAP and CAER-S accuracy, as the authors' ``test.py``.

Protocol (the authors' ``test.py:infer``): images in increasing image id; for every ground-truth
person, the prediction is the score vector of the subject query whose box has the highest IoU with
the person's box, IoU computed with the +1-pixel convention; ties go to the highest query index, and
several persons may pick the same query (a person overlapping no prediction gets the last query).
EMOTIC: scikit-learn's ``average_precision_score`` per emotion over all persons of the split, macro
mean (an emotion without positives scores 0 and counts in the mean). CAER-S: share of faces whose
arg-max emotion equals the label.
"""

import logging
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from tabulate import tabulate

__all__ = [
    "CAEREvaluator",
    "EmoticEvaluator",
    "emotion_average_precision",
    "match_persons_to_queries",
]

logger = logging.getLogger(__name__)

# Persons-per-image groups of seed Table 2: exactly 1, 2, 3, 4, and 5 or more.
PERSON_GROUPS = ((1, "1"), (2, "2"), (3, "3"), (4, "4"), (5, ">=5"))


def match_persons_to_queries(person_boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    """
    The query of highest IoU for each person, with the authors' +1-pixel IoU: areas
    (x2 - x1 + 1)(y2 - y1 + 1) and intersection sides max(0, min - max + 1). Ties go to the highest
    query index (their ``argsort()[-1]``); a person overlapping no query gets the last one.

    Args:
        person_boxes: (P, 4) xyxy ground-truth boxes.
        query_boxes: (N, 4) xyxy predicted boxes, in query order.

    Returns:
        (P,) int64 query index per person.
    """
    person_boxes = np.asarray(person_boxes, dtype=np.float64).reshape(-1, 4)
    query_boxes = np.asarray(query_boxes, dtype=np.float64).reshape(-1, 4)
    if len(query_boxes) == 0:
        raise ValueError("match_persons_to_queries: no predicted boxes")
    area_person = (person_boxes[:, 2] - person_boxes[:, 0] + 1) * (
        person_boxes[:, 3] - person_boxes[:, 1] + 1
    )
    area_query = (query_boxes[:, 2] - query_boxes[:, 0] + 1) * (
        query_boxes[:, 3] - query_boxes[:, 1] + 1
    )
    left_top = np.maximum(person_boxes[:, None, :2], query_boxes[None, :, :2])
    right_bottom = np.minimum(person_boxes[:, None, 2:], query_boxes[None, :, 2:])
    sides = np.maximum(0.0, right_bottom - left_top + 1)
    intersection = sides[..., 0] * sides[..., 1]
    iou = intersection / (area_person[:, None] + area_query[None, :] - intersection)
    # Highest index among the maxima: arg-max over the reversed query order.
    num_queries = iou.shape[1]
    return (num_queries - 1 - np.argmax(iou[:, ::-1], axis=1)).astype(np.int64)


def emotion_average_precision(labels: np.ndarray, scores: np.ndarray) -> Tuple[float, np.ndarray]:
    """
    Args:
        labels: (P, K) 0/1 ground truth of P persons.
        scores: (P, K) their predicted scores.

    Returns:
        mAP (scikit-learn's macro ``average_precision_score``, as the authors) and the (K,) APs
        (an emotion without positives has AP 0 in the scikit-learn the reference was measured with,
        1.9; its warning is silenced here and the caller logs such emotions).
    """
    from sklearn.metrics import average_precision_score

    with warnings.catch_warnings():
        # "No positive class found in y_true": the AP of such an emotion is 0 and it still counts
        # in the mean, as in the authors' run; the count is logged by the caller.
        warnings.filterwarnings("ignore", message="No positive class found")
        mean_ap = float(average_precision_score(labels, scores))
        per_class = np.asarray(
            average_precision_score(labels, scores, average=None), dtype=np.float64
        )
    return mean_ap, per_class


class _EmotionEvaluator(DatasetEvaluator):
    """Collects per-image subject predictions, matches them to the persons of the registered
    dataset and leaves the metric to subclasses."""

    _task = ""

    def __init__(
        self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None
    ):
        """
        Args:
            dataset_name: a registered dataset whose dicts hold ``image_id`` and annotations with
                ``bbox`` / ``bbox_mode`` and ``emotions`` (e.g. ``emotic_test``, ``caer_s_test``).
            distributed: gather the predictions of all processes and compute on the main one.
            output_dir: unused (kept for detectron2's evaluator signature).
        """
        if not isinstance(dataset_name, str) or not dataset_name:
            raise ValueError(
                f"{type(self).__name__}: dataset_name must be a non-empty string, got {dataset_name!r}"
            )
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._emotion_classes = list(MetadataCatalog.get(dataset_name).get("emotion_classes", []))
        self.reset()

    def reset(self) -> None:
        self._predictions: Dict[Any, Tuple[np.ndarray, np.ndarray]] = {}

    def process(self, inputs: Sequence[Dict], outputs: Sequence[Dict]) -> None:
        """inputs[i]["image_id"]; outputs[i]["instances"] with ``pred_boxes`` (N, 4) xyxy in the
        original image and ``emotion_scores`` (N, K), one row per subject query."""
        for index, (item, output) in enumerate(zip(inputs, outputs)):
            if "image_id" not in item:
                raise ValueError(f"{type(self).__name__}: inputs[{index}] has no 'image_id'")
            instances = output["instances"].to("cpu")
            if not instances.has("emotion_scores"):
                raise ValueError(
                    f"{type(self).__name__}: outputs[{index}]['instances'] has no emotion_scores "
                    "(is the model DSCT?)"
                )
            self._predictions[item["image_id"]] = (
                instances.pred_boxes.tensor.numpy().astype(np.float64),
                instances.emotion_scores.numpy().astype(np.float64),
            )

    def _gathered(self) -> Optional[Dict[Any, Tuple[np.ndarray, np.ndarray]]]:
        if not self._distributed:
            return self._predictions
        comm.synchronize()
        parts = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        merged: Dict[Any, Tuple[np.ndarray, np.ndarray]] = {}
        for part in parts:
            merged.update(part)
        return merged

    def _matched(self, predictions) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per person, in image-id order: labels (P, K), scores (P, K), persons in its image (P,);
        and the number of persons of every image that has some (I,)."""
        labels, scores, group_sizes, image_counts = [], [], [], []
        for record in sorted(DatasetCatalog.get(self._dataset_name), key=lambda r: r["image_id"]):
            annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
            if not annotations:
                continue
            image_id = record["image_id"]
            if image_id not in predictions:
                raise ValueError(
                    f"{type(self).__name__}: no prediction for image_id {image_id} "
                    f"({record.get('file_name')}) of {self._dataset_name}"
                )
            boxes, image_scores = predictions[image_id]
            person_boxes = []
            for annotation in annotations:
                if "emotions" not in annotation:
                    raise ValueError(
                        f"{type(self).__name__}: an annotation of {record.get('file_name')} in "
                        f"{self._dataset_name} has no 'emotions'"
                    )
                mode = annotation.get("bbox_mode", BoxMode.XYWH_ABS)
                person_boxes.append(
                    BoxMode.convert(list(annotation["bbox"]), mode, BoxMode.XYXY_ABS)
                )
                labels.append(annotation["emotions"])
                group_sizes.append(len(annotations))
            queries = match_persons_to_queries(np.asarray(person_boxes), boxes)
            scores.extend(image_scores[queries])
            image_counts.append(len(annotations))
        if not labels:
            raise ValueError(f"{type(self).__name__}: {self._dataset_name} has no annotated person")
        return (
            np.asarray(labels, dtype=np.int64),
            np.asarray(scores),
            np.asarray(group_sizes),
            np.asarray(image_counts),
        )

    def _names(self, num_classes: int) -> List[str]:
        if len(self._emotion_classes) == num_classes:
            return self._emotion_classes
        return [str(index) for index in range(num_classes)]


class EmoticEvaluator(_EmotionEvaluator):
    """EMOTIC mAP of the authors' ``test.py`` (see the module docstring).

    ``evaluate()`` returns ``{"emotic": {"mAP", "AP-<emotion>" x 26, "mAP-persons=1" .. "=4",
    "mAP-persons>=5" (groups with images only), "mAP-chance"}}`` in percent. ``mAP-chance`` is the
    mAP of a constant score, i.e. the mean positive rate of the split (a random score's expected
    AP).
    """

    _task = "emotic"

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        predictions = self._gathered()
        if predictions is None:
            return {}
        labels, scores, group_sizes, image_counts = self._matched(predictions)
        if scores.shape != labels.shape:
            raise ValueError(
                f"EmoticEvaluator: {scores.shape[1]} emotion scores per query but {labels.shape[1]} "
                f"labels per person in {self._dataset_name}"
            )
        names = self._names(labels.shape[1])
        mean_ap, per_class = emotion_average_precision(labels, scores)
        chance, _ = emotion_average_precision(labels, np.zeros_like(scores))
        results: Dict[str, float] = OrderedDict(mAP=100 * mean_ap)
        for name, value in zip(names, per_class):
            results[f"AP-{name}"] = 100 * float(value)
        group_rows = []
        for size, label in PERSON_GROUPS:
            members = group_sizes == size if size < 5 else group_sizes >= size
            num_images = int(
                (image_counts == size).sum() if size < 5 else (image_counts >= size).sum()
            )
            if not members.any():
                group_rows.append((label, 0, 0, "n/a"))
                continue
            group_ap, _ = emotion_average_precision(labels[members], scores[members])
            key = f"mAP-persons={label}" if size < 5 else "mAP-persons>=5"
            results[key] = 100 * group_ap
            group_rows.append((label, num_images, int(members.sum()), f"{100 * group_ap:.2f}"))
        results["mAP-chance"] = 100 * chance

        positives = labels.sum(0)
        rows = [
            (name, int(count), f"{100 * value:.2f}")
            for name, count, value in zip(names, positives, per_class)
        ]
        logger.info(
            f"EMOTIC evaluation of {self._dataset_name}: {len(labels)} persons in "
            f"{len(image_counts)} images\n"
            + tabulate(rows, headers=["emotion", "#positives", "AP"], tablefmt="pipe")
            + "\n"
            + tabulate(
                group_rows, headers=["persons/image", "#images", "#persons", "mAP"], tablefmt="pipe"
            )
        )
        without_positives = [name for name, count in zip(names, positives) if count == 0]
        if without_positives:
            logger.warning(
                f"{len(without_positives)} emotions have no positive in {self._dataset_name} "
                f"({without_positives}): AP 0, counted in the mean as the authors' scikit-learn does"
            )
        logger.info(
            f"EMOTIC mAP {100 * mean_ap:.2f} (chance level, a constant score: {100 * chance:.2f})"
        )
        return {self._task: results}


class CAEREvaluator(_EmotionEvaluator):
    """CAER-S accuracy of the authors' ``test.py``: the arg-max of the matched query's scores
    against the face's label. ``evaluate()`` returns ``{"caer_s": {"accuracy", "accuracy-<class>"}}``
    in percent (per class: the share of that class's faces classified correctly)."""

    _task = "caer_s"

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        predictions = self._gathered()
        if predictions is None:
            return {}
        labels, scores, _, _ = self._matched(predictions)
        if (labels.sum(1) != 1).any():
            raise ValueError(
                f"CAEREvaluator: every face of {self._dataset_name} needs exactly one label"
            )
        names = self._names(labels.shape[1])
        truth, predicted = labels.argmax(1), scores.argmax(1)
        results: Dict[str, float] = OrderedDict(accuracy=100 * float((truth == predicted).mean()))
        for index, name in enumerate(names):
            members = truth == index
            if members.any():
                results[f"accuracy-{name}"] = 100 * float((predicted[members] == index).mean())
        logger.info(
            f"CAER-S evaluation of {self._dataset_name}: {len(labels)} faces, accuracy "
            f"{results['accuracy']:.2f}"
        )
        return {self._task: results}
