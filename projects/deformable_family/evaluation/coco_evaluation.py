"""COCO box evaluation that works with and without detectron2's compiled ops."""
import inspect
import logging
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from ..utils.d2_compat import detectron2_has_compiled_ops

__all__ = ["build_coco_evaluator"]

logger = logging.getLogger(__name__)


def build_coco_evaluator(
    dataset_name: str,
    output_dir: Optional[str] = None,
    distributed: bool = True,
    max_dets_per_image: int = 100,
) -> COCOEvaluator:
    """detectron2's ``COCOEvaluator`` for boxes: AP, AP50, AP75, APs/m/l and per-category AP.

    ``use_fast_impl`` (detectron2's C++ COCOeval) is used only when detectron2's compiled ops are
    installed; otherwise pycocotools' Python COCOeval, with identical numbers.

    Args:
        dataset_name: a dataset registered in DatasetCatalog whose metadata has ``json_file`` (or
            which detectron2 can convert to COCO json).
        output_dir: where predictions are written; None keeps them in memory only.
        distributed: gather predictions from all ranks before evaluating.
        max_dets_per_image: detections kept per image (COCO's default 100; the model's top-k
            should match). Only detectron2 main accepts it; v0.6 always uses 100.
    """
    if not isinstance(dataset_name, str) or not dataset_name:
        raise ValueError(f"build_coco_evaluator: dataset_name must be a non-empty string, got {dataset_name!r}")
    json_file = MetadataCatalog.get(dataset_name).get("json_file", None)
    if json_file is not None and "://" not in json_file and not os.path.exists(json_file):
        # Datasets generated on first use (the synthetic "shapes") write their json when their
        # dicts are first loaded; COCOEvaluator reads the json in its constructor.
        DatasetCatalog.get(dataset_name)
    use_fast_impl = detectron2_has_compiled_ops()
    if not use_fast_impl:
        logger.info("detectron2 has no compiled ops: COCO evaluation uses pycocotools' Python COCOeval")
    kwargs = dict(tasks=("bbox",), distributed=distributed, output_dir=output_dir, use_fast_impl=use_fast_impl)
    if "max_dets_per_image" in inspect.signature(COCOEvaluator.__init__).parameters:
        kwargs["max_dets_per_image"] = max_dets_per_image
    elif max_dets_per_image != 100:
        raise ValueError(
            f"build_coco_evaluator: this detectron2 ({COCOEvaluator.__module__}) only evaluates 100 "
            f"detections per image; got max_dets_per_image={max_dets_per_image}"
        )
    return COCOEvaluator(dataset_name, **kwargs)
