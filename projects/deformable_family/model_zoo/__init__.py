"""The model zoo: the configs of ``configs/`` reached by name, from any folder, as
``detectron2.model_zoo`` reaches detectron2's.

    from deformable_family import model_zoo
    model_zoo.list_configs()                                    # every name
    cfg = model_zoo.get_config("deformable_detr/deformable_detr_r50_50ep.py")   # a LazyConfig
    model = model_zoo.get("quickstart/deformable_detr_shapes.py", device="cpu")  # the built model

``python -m deformable_family.model_zoo [PREFIX ...]`` prints the table of configs (family, variant,
backbone, schedule, parameters, GFLOPs, the paper's AP); see :mod:`.catalog` for where each column
comes from and how a new detector family fills its rows.
"""

from .model_zoo import (
    NO_PUBLISHED_WEIGHTS,
    configs_root,
    get,
    get_config,
    get_config_file,
    list_configs,
    resolve_config_file,
)

__all__ = [
    "NO_PUBLISHED_WEIGHTS",
    "configs_root",
    "get",
    "get_config",
    "get_config_file",
    "list_configs",
    "resolve_config_file",
]
