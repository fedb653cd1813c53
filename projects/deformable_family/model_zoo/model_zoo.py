"""Configs reached by name, as with ``detectron2.model_zoo``.

A model-zoo name is a config's path relative to the repository's ``configs/`` folder, e.g.
``"deformable_detr/deformable_detr_r50_50ep.py"``. The configs are found

* in an installed package: ``deformable_family/model_zoo/configs/``, where ``setup.py`` copies the
  repository's ``configs/`` tree (package data, as detectron2 installs its model-zoo configs);
* in a source checkout (an editable install, or ``PYTHONPATH=projects``): the checkout's own
  ``configs/``, so that edits there take effect without reinstalling.

Configs keep importing each other relatively (``from ..common.train import train``): the installed
tree has the same layout as the repository's.
"""

import difflib
import os
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from omegaconf import DictConfig

__all__ = [
    "configs_root",
    "list_configs",
    "get_config_file",
    "get_config",
    "get",
    "resolve_config_file",
]

# Folders of shared pieces (data, model, optimizer, schedule, train settings), not complete configs.
PIECE_FOLDERS = ("common",)

_PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# projects/deformable_family/model_zoo/ -> the checkout's root.
_CHECKOUT_CONFIGS = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "configs")
)

NO_PUBLISHED_WEIGHTS = (
    "deformable_family publishes no trained weights, so trained=True has nothing to load. Load your own "
    "checkpoint with model_zoo.get(name, checkpoint='model_final.pth') (a train_net.py output, or the "
    "authors' release converted by tools/convert_official_deformable_detr.py), or set "
    "cfg.train.init_checkpoint on the config from model_zoo.get_config(name)."
)


def configs_root() -> str:
    """The folder holding the model-zoo configs (installed package data, else the source checkout's
    ``configs/``)."""
    for root in (_PACKAGE_CONFIGS, _CHECKOUT_CONFIGS):
        if os.path.isdir(os.path.join(root, "common")):
            return root
    raise RuntimeError(
        f"deformable_family's configs are missing: neither {_PACKAGE_CONFIGS} (installed package data) nor "
        f"{_CHECKOUT_CONFIGS} (a source checkout) holds them. Reinstall the package from its repository "
        "(pip install --no-build-isolation .)."
    )


def is_installed_copy(path: str) -> bool:
    """Whether ``path`` lies in the installed copy of the configs (not in a source checkout)."""
    return os.path.abspath(path).startswith(_PACKAGE_CONFIGS + os.sep)


def list_configs() -> List[str]:
    """Every model-zoo name (complete configs; the shared pieces in ``common/`` are left out), sorted."""
    root = configs_root()
    names = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(("_", ".")))
        relative = os.path.relpath(folder, root)
        if relative == "." or relative.split(os.sep)[0] in PIECE_FOLDERS:
            continue
        for file in files:
            if file.endswith(".py") and not file.startswith("_"):
                names.append(os.path.join(relative, file).replace(os.sep, "/"))
    return sorted(names)


def close_names(name: str, names: Optional[List[str]] = None, limit: int = 5) -> List[str]:
    """Model-zoo names that look like ``name`` (same file in another folder first, then by spelling)."""
    names = list_configs() if names is None else names
    base = os.path.basename(name)
    same_file = [n for n in names if os.path.basename(n) in (base, base + ".py")]
    spelled = difflib.get_close_matches(name, names, n=limit, cutoff=0.5)
    spelled += difflib.get_close_matches(
        base, [os.path.basename(n) for n in names], n=limit, cutoff=0.6
    )
    matches = []
    for candidate in same_file + spelled:
        full = (
            candidate
            if "/" in candidate
            else next(n for n in names if os.path.basename(n) == candidate)
        )
        if full not in matches:
            matches.append(full)
    return matches[:limit]


def _not_found_message(name: str, what: str) -> str:
    names = list_configs()
    suggestions = close_names(name, names)
    hint = f" Close names: {', '.join(suggestions)}." if suggestions else ""
    return (
        f"{what} {name!r}.{hint} `python -m deformable_family.model_zoo` lists all {len(names)} configs "
        f"(names are paths relative to {configs_root()})."
    )


def _lookup(name: str) -> Optional[str]:
    """The file of a model-zoo name (``.py`` may be left out), or None."""
    root = configs_root()
    for candidate in (name, name + ".py"):
        normalised = os.path.normpath(candidate)
        if normalised.startswith(("..", os.sep)) or normalised.split(os.sep)[0] in PIECE_FOLDERS:
            continue
        path = os.path.join(root, normalised)
        if candidate.endswith(".py") and os.path.isfile(path):
            return path
    return None


def get_config_file(name: str) -> str:
    """The path of a model-zoo config.

    Args:
        name: path relative to the repository's ``configs/``, e.g.
            ``"deformable_detr/deformable_detr_r50_50ep.py"`` (the ``.py`` may be left out).

    Raises:
        FileNotFoundError: ``name`` is not a model-zoo config; the message lists close names.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"model_zoo: a config name must be a non-empty string, got {name!r}")
    path = _lookup(name)
    if path is None:
        raise FileNotFoundError(_not_found_message(name, "No model-zoo config named"))
    return path


def get_config(name: str, trained: bool = False) -> DictConfig:
    """The LazyConfig of a model-zoo config (``model``, ``dataloader``, ``optimizer``,
    ``lr_multiplier``, ``train``).

    Args:
        name: see :func:`get_config_file`.
        trained: must be False: there are no published weights of ours (see :func:`get`).
    """
    if trained:
        raise RuntimeError(NO_PUBLISHED_WEIGHTS)
    return LazyConfig.load(get_config_file(name))


def get(
    name: str, trained: bool = False, device: Optional[str] = None, checkpoint: Optional[str] = None
) -> torch.nn.Module:
    """Build the model of a model-zoo config, as ``detectron2.model_zoo.get``.

    Args:
        name: see :func:`get_config_file`.
        trained: must be False. detectron2's ``trained=True`` downloads its published weights; this
            project publishes none (see README, "Model zoo"), so it raises an error that says how to
            load weights of your own: ``checkpoint``.
        device: where the model goes; None: ``cpu`` when no GPU is visible, else the config's
            ``train.device``.
        checkpoint: a checkpoint to load with detectron2's ``DetectionCheckpointer`` (e.g. a
            ``train_net.py`` output or a converted release of the authors); None loads the config's
            ``train.init_checkpoint`` when it is set (empty in every shipped config: random weights).

    Returns:
        the model in training mode, as detectron2's; call ``.eval()`` for inference.
    """
    cfg = get_config(name, trained)
    if device is None:
        device = cfg.train.get("device", "cuda") if torch.cuda.is_available() else "cpu"
    weights = checkpoint if checkpoint is not None else cfg.train.get("init_checkpoint", "")
    if checkpoint is not None and "://" not in checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"model_zoo.get: checkpoint {checkpoint!r} does not exist")
    model = instantiate(cfg.model).to(device)
    if weights:
        DetectionCheckpointer(model).load(weights)
    return model


def resolve_config_file(path_or_name: str) -> str:
    """A ``--config-file`` argument of ``train_net.py`` and ``tools/*.py``: an existing file is used as
    it is; otherwise a model-zoo name, also written with the ``configs/`` prefix of the repository
    (``configs/deformable_detr/deformable_detr_r50_50ep.py`` works from any folder).

    Raises:
        FileNotFoundError: neither a file nor a model-zoo name; the message lists close names.
    """
    if not isinstance(path_or_name, str) or not path_or_name:
        raise TypeError(f"--config-file must be a path or a model-zoo name, got {path_or_name!r}")
    if os.path.isfile(path_or_name):
        return path_or_name
    name = path_or_name
    if name.replace(os.sep, "/").startswith("configs/"):
        name = name[len("configs/") :]
    path = _lookup(name)
    if path is None:
        raise FileNotFoundError(
            _not_found_message(
                path_or_name, "--config-file: no such file, and no model-zoo config named"
            )
        )
    return path
