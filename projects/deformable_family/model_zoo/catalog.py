"""The table of model-zoo configs (``python -m deformable_family.model_zoo``, the README's models table).

Each row comes from three places, all in the config's folder (``configs/<family>/``):

* the config itself: backbone (``model.backbone``) and schedule (``train.max_iter``,
  ``dataloader.train.total_batch_size`` and the training set);
* ``model_zoo.yaml``, written by hand: the family's name and paper, and per config its variant and the
  paper's AP (COCO val2017 box AP unless ``metric`` says otherwise; null where the paper has none);
* ``model_stats.json``, written by ``tools/model_stats.py --config-file NAME --record``: parameter
  counts and GFLOPs of the config as shipped.

A new detector family needs nothing here: its folder is listed as soon as it holds configs. To fill its
rows, add ``configs/<family>/model_zoo.yaml`` (copy ``configs/deformable_detr/model_zoo.yaml``: a
``family`` line and one ``file.py: {variant: ..., paper_ap: ...}`` line per config) and run
``python tools/model_stats.py --config-file <family>/<file>.py --record`` for each config.
"""

import inspect
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml
from detectron2.config import LazyConfig

from .model_zoo import configs_root, list_configs

__all__ = ["ZooEntry", "read_metadata", "read_stats", "record_stats", "zoo_entries", "render_table"]

METADATA_FILE = "model_zoo.yaml"
STATS_FILE = "model_stats.json"
_METADATA_KEYS = {"family", "paper", "metric", "configs"}
_ENTRY_KEYS = {"variant", "paper_ap", "family"}
DEFAULT_METRIC = "COCO val2017 box AP"
_STATS_KEYS = {"parameters", "trainable_parameters", "gflops", "input_size"}

# Training-set sizes, to express a schedule in epochs: (dataset name, filter_empty) -> images.
# COCO train2017 has 118,287 images, 117,266 of them with annotations.
DATASET_SIZES = {
    ("coco_2017_train", False): 118287,
    ("coco_2017_train", True): 117266,
}


@dataclass
class ZooEntry:
    """One row of the table."""

    name: str  # model-zoo name, e.g. "deformable_detr/deformable_detr_r50_50ep.py"
    family: str
    variant: str
    backbone: str
    schedule: str
    parameters: Optional[int]  # None: not recorded
    gflops: Optional[float]
    input_size: Optional[Sequence[int]]  # (height, width) of the GFLOPs count
    paper_ap: Optional[float]
    paper: Optional[str]  # the family's paper, where paper_ap comes from
    metric: str  # what paper_ap measures


def read_metadata(folder: str) -> Dict[str, Any]:
    """``folder/model_zoo.yaml``, validated (``{}`` when the folder has none).

    Keys: ``family`` (the name shown; default: the folder's), ``paper`` (where the AP comes from),
    ``metric`` (what the AP measures; default: COCO val2017 box AP) and ``configs``: per config file
    ``variant``, ``paper_ap`` (a number or null) and optionally its own ``family`` (a folder such as
    ``quickstart/`` holds several families).
    """
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        metadata = yaml.safe_load(f) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a mapping, got {metadata!r}")
    for key in ("family", "paper", "metric"):
        if key in metadata and not isinstance(metadata[key], str):
            raise ValueError(f"{path}: '{key}' must be a string, got {metadata[key]!r}")
    unknown = set(metadata) - _METADATA_KEYS
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_METADATA_KEYS)}"
        )
    configs = metadata.setdefault("configs", {}) or {}
    if not isinstance(configs, dict):
        raise ValueError(
            f"{path}: 'configs' must map config file names to entries, got {configs!r}"
        )
    for file, entry in configs.items():
        where = f"{path}: configs[{file!r}]"
        if not os.path.isfile(os.path.join(folder, file)):
            raise ValueError(f"{where}: no such config in {folder}")
        if not isinstance(entry, dict) or set(entry) - _ENTRY_KEYS:
            raise ValueError(
                f"{where}: expected a mapping with keys among {sorted(_ENTRY_KEYS)}, got {entry!r}"
            )
        if "family" in entry and not isinstance(entry["family"], str):
            raise ValueError(f"{where}: family must be a string, got {entry['family']!r}")
        paper_ap = entry.get("paper_ap")
        if paper_ap is not None and (
            isinstance(paper_ap, bool) or not isinstance(paper_ap, (int, float))
        ):
            raise ValueError(f"{where}: paper_ap must be a number or null, got {paper_ap!r}")
    metadata["configs"] = configs
    return metadata


def read_stats(folder: str) -> Dict[str, Dict[str, Any]]:
    """``folder/model_stats.json``: ``{config file name: {parameters, trainable_parameters, gflops,
    input_size}}`` (``{}`` when the folder has none)."""
    path = os.path.join(folder, STATS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        stats = json.load(f)
    for file, record in stats.items():
        if not isinstance(record, dict) or set(record) != _STATS_KEYS:
            raise ValueError(
                f"{path}: record {file!r} must have exactly the keys {sorted(_STATS_KEYS)}, got {record!r}"
            )
    return stats


def record_stats(
    config_file: str,
    parameters: int,
    trainable_parameters: int,
    gflops: Optional[float] = None,
    input_size: Optional[Sequence[int]] = None,
) -> str:
    """Write the statistics of ``config_file`` (as shipped, no overrides) into ``model_stats.json`` of
    its folder, replacing its previous record; returns the JSON file's path."""
    folder, file = os.path.split(os.path.abspath(config_file))
    path = os.path.join(folder, STATS_FILE)
    stats = read_stats(folder)
    stats[file] = {
        "parameters": int(parameters),
        "trainable_parameters": int(trainable_parameters),
        "gflops": None if gflops is None else round(float(gflops), 1),
        "input_size": None if input_size is None else [int(size) for size in input_size],
    }
    # One line per config: a re-recorded config changes one line of the diff.
    lines = [
        f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)}"
        for key, value in sorted(stats.items())
    ]
    with open(path + ".tmp", "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(path + ".tmp", path)
    return path


def _backbone(cfg) -> str:
    backbone = cfg.get("model", {}).get("backbone")
    if backbone is None:
        return "-"
    target = backbone.get("_target_")
    class_name = getattr(target, "__name__", str(target).rsplit(".", 1)[-1])
    depth = backbone.get("depth")
    return f"R{depth}" if depth is not None and "ResNet" in class_name else class_name


def _filter_empty(dataset) -> Optional[bool]:
    """The dataset call's ``filter_empty``: set in the config, else its function's default."""
    if "filter_empty" in dataset:
        return bool(dataset.filter_empty)
    try:
        default = inspect.signature(dataset.get("_target_")).parameters["filter_empty"].default
    except (TypeError, ValueError, KeyError):
        return None
    return None if default is inspect.Parameter.empty else bool(default)


def _schedule(cfg) -> str:
    max_iter = cfg.get("train", {}).get("max_iter")
    loader = cfg.get("dataloader", {}).get("train", {})
    batch = loader.get("total_batch_size")
    if max_iter is None or batch is None:
        return "-"
    dataset = loader.get("dataset", {})
    names = dataset.get("names") if hasattr(dataset, "get") else None
    size = DATASET_SIZES.get((names, _filter_empty(dataset))) if isinstance(names, str) else None
    if size is None:
        return f"{max_iter:,} iter, batch {batch}"
    epochs = max_iter * batch / size
    # train.max_iter is rounded up from a whole number of epochs.
    shown = (
        f"{round(epochs)}" if math.isclose(epochs, round(epochs), abs_tol=0.05) else f"{epochs:.1f}"
    )
    return f"{shown} ep, batch {batch}"


def zoo_entries(prefixes: Iterable[str] = ()) -> List[ZooEntry]:
    """The rows of the configs whose names start with one of ``prefixes`` (all when empty), by
    folder, then in the order of the folder's ``model_zoo.yaml``, then by name."""
    prefixes = tuple(prefixes)
    root = configs_root()
    by_folder: Dict[str, List[str]] = {}
    for name in list_configs():
        if not prefixes or name.startswith(prefixes):
            by_folder.setdefault(os.path.dirname(name), []).append(name)
    entries = []
    for folder_name, names in sorted(by_folder.items()):
        folder = os.path.join(root, folder_name)
        metadata = read_metadata(folder)
        described = metadata.get("configs", {})
        stats = read_stats(folder)
        order = list(described)
        names.sort(
            key=lambda n: (
                order.index(os.path.basename(n)) if os.path.basename(n) in order else len(order),
                n,
            )
        )
        for name in names:
            file = os.path.basename(name)
            cfg = LazyConfig.load(os.path.join(root, name))
            entry = described.get(file, {})
            record = stats.get(file, {})
            entries.append(
                ZooEntry(
                    name=name,
                    family=entry.get("family", metadata.get("family", folder_name)),
                    variant=entry.get("variant", os.path.splitext(file)[0]),
                    backbone=_backbone(cfg),
                    schedule=_schedule(cfg),
                    parameters=record.get("parameters"),
                    gflops=record.get("gflops"),
                    input_size=record.get("input_size"),
                    paper_ap=entry.get("paper_ap"),
                    paper=metadata.get("paper"),
                    metric=metadata.get("metric", DEFAULT_METRIC),
                )
            )
    return entries


def render_table(entries: Sequence[ZooEntry]) -> str:
    """A Markdown table of ``entries`` (``-`` for what is not recorded), then the papers of the AP
    column."""
    sizes = {tuple(e.input_size) for e in entries if e.gflops is not None}
    gflops_header = "GFLOPs" if len(sizes) != 1 else "GFLOPs ({}x{})".format(*next(iter(sizes)))

    def gflops(entry: ZooEntry) -> str:
        if entry.gflops is None:
            return "-"
        return f"{entry.gflops:.1f}" + (
            "" if len(sizes) == 1 else " ({}x{})".format(*entry.input_size)
        )

    header = [
        "config",
        "family",
        "variant",
        "backbone",
        "schedule",
        "params",
        gflops_header,
        "AP (paper)",
    ]
    rows = [
        [
            f"`{e.name}`",
            e.family,
            e.variant,
            e.backbone,
            e.schedule,
            "-" if e.parameters is None else f"{e.parameters:,}",
            gflops(e),
            "-" if e.paper_ap is None else f"{e.paper_ap:.1f}",
        ]
        for e in entries
    ]
    right_aligned = {5, 6, 7}
    lines = ["| " + " | ".join(header) + " |"]
    lines.append(
        "| "
        + " | ".join("---:" if i in right_aligned else "---" for i in range(len(header)))
        + " |"
    )
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    sources = {}
    for entry in entries:
        if entry.paper_ap is not None:
            source = entry.metric + (f", {entry.paper}" if entry.paper else "")
            sources.setdefault(entry.family, source)
    if sources:
        lines += ["", "AP (paper): " + "; ".join(f"{f}: {s}" for f, s in sources.items()) + "."]
    return "\n".join(lines)
