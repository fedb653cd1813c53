"""Dataset dicts from detectron2's ``DatasetCatalog``, with degenerate boxes removed and counted.

This replaces detectron2's ``get_detection_dataset_dicts`` for the family: its class histogram
(``print_instances_class_histogram`` in v0.6) uses ``np.int`` and crashes with numpy 2.
"""
import itertools
import logging
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from tabulate import tabulate

__all__ = ["load_dataset_dicts", "drop_degenerate_boxes", "class_histogram"]

logger = logging.getLogger(__name__)


def _box_xyxy(annotation: Dict[str, Any]) -> np.ndarray:
    return np.asarray(
        BoxMode.convert(list(annotation["bbox"]), annotation.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS),
        dtype=np.float64,
    )


def _is_degenerate(box_xyxy: np.ndarray, height: Union[int, None], width: Union[int, None]) -> bool:
    """True for a box with no area, a non-finite coordinate, or no overlap with the image."""
    if not np.all(np.isfinite(box_xyxy)):
        return True
    x0, y0, x1, y1 = box_xyxy
    if height is not None and width is not None:
        # Only the part inside the image can ever be seen by the model.
        x0, x1 = np.clip([x0, x1], 0, width)
        y0, y1 = np.clip([y0, y1], 0, height)
    return bool(x1 <= x0 or y1 <= y0)


def drop_degenerate_boxes(dataset_dicts: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], int]:
    """Remove annotations whose box is degenerate (zero or negative size, non-finite, or entirely
    outside the image when ``height``/``width`` are known).

    Returns:
        The dicts (shallow copies where annotations were removed) and the number of boxes dropped.
    """
    dropped = 0
    out = []
    for record in dataset_dicts:
        annotations = record.get("annotations")
        if not annotations:
            out.append(record)
            continue
        height, width = record.get("height"), record.get("width")
        kept = []
        for annotation in annotations:
            if "bbox" in annotation and _is_degenerate(_box_xyxy(annotation), height, width):
                dropped += 1
            else:
                kept.append(annotation)
        if len(kept) != len(annotations):
            record = dict(record, annotations=kept)
        out.append(record)
    return out, dropped


def class_histogram(dataset_dicts: List[Dict[str, Any]], class_names: Sequence[str]) -> str:
    """A table of instance counts per class (crowd boxes excluded), as text for the log."""
    counts = np.zeros(len(class_names), dtype=np.int64)
    for record in dataset_dicts:
        for annotation in record.get("annotations", []):
            if annotation.get("iscrowd", 0):
                continue
            category = int(annotation["category_id"])
            if not 0 <= category < len(class_names):
                raise ValueError(
                    f"class_histogram: category_id {category} of {record.get('file_name')} is outside "
                    f"[0, {len(class_names)})"
                )
            counts[category] += 1
    rows = [(name, int(count)) for name, count in zip(class_names, counts)]
    rows.append(("total", int(counts.sum())))
    return tabulate(rows, headers=["category", "#instances"], tablefmt="pipe")


def load_dataset_dicts(
    names: Union[str, Sequence[str]],
    filter_empty: bool = False,
) -> List[Dict[str, Any]]:
    """Concatenate the dicts of registered datasets, dropping degenerate boxes.

    Args:
        names: one registered dataset name or a list of them.
        filter_empty: remove images with no (non-crowd) annotation left. The authors keep them on
            COCO, so the default is False.

    Returns:
        A list of detectron2 dataset dicts. The numbers of boxes and images dropped are logged,
        with a class histogram when the metadata has ``thing_classes``.
    """
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("load_dataset_dicts: names is empty")
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise KeyError(f"load_dataset_dicts: dataset {name!r} is not registered in DatasetCatalog")

    per_dataset = [DatasetCatalog.get(name) for name in names]
    for name, dicts in zip(names, per_dataset):
        if len(dicts) == 0:
            raise ValueError(f"load_dataset_dicts: dataset {name!r} is empty")
    dataset_dicts = list(itertools.chain.from_iterable(per_dataset))

    dataset_dicts, num_dropped = drop_degenerate_boxes(dataset_dicts)
    logger.info(f"Dropped {num_dropped} degenerate boxes (zero/negative size or outside the image) from {names}")

    if filter_empty:
        before = len(dataset_dicts)
        dataset_dicts = [
            d for d in dataset_dicts if any(a.get("iscrowd", 0) == 0 for a in d.get("annotations", []))
        ]
        logger.info(f"Removed {before - len(dataset_dicts)} images with no annotations; {len(dataset_dicts)} left")

    class_names = MetadataCatalog.get(names[0]).get("thing_classes", None)
    if class_names is not None and all("annotations" in d for d in dataset_dicts):
        logger.info(f"Instances per category in {names}:\n" + class_histogram(dataset_dicts, class_names))
    return dataset_dicts
