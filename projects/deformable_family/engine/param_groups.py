"""Optimizer parameter groups with learning-rate multipliers chosen by parameter name.

detectron2 v0.6's ``get_default_optimizer_params`` has no ``lr_factor_func``, so the recipe of the
authors (backbone and the sampling-offset / reference-point projections at 0.1x the base lr) is
built here, once, for every detector of the family.
"""
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

__all__ = ["param_groups_by_name"]

logger = logging.getLogger(__name__)


def param_groups_by_name(
    model: nn.Module,
    base_lr: float,
    lr_multipliers: Optional[Mapping[str, float]] = None,
    weight_decay: Optional[float] = None,
    weight_decay_norm: Optional[float] = None,
    optional_lr_multiplier_keys: Sequence[str] = (),
) -> List[Dict[str, Any]]:
    """Group the trainable parameters of ``model`` by the learning-rate multiplier they get.

    A parameter whose full name contains a key of ``lr_multipliers`` as a substring gets
    ``lr = base_lr * multiplier``; when several keys match, the first in the mapping's order wins.
    Parameters with ``requires_grad=False`` are left out. Parameters are never duplicated (a module
    shared under two names is counted once, under the first name).

    Args:
        model: the model whose parameters are grouped.
        base_lr: the optimizer's base learning rate (use ``"${..lr}"`` in a LazyConfig so that a
            command-line override of ``optimizer.lr`` reaches the groups).
        lr_multipliers: ``{name substring: multiplier}``, e.g. ``{"backbone.body.": 0.1}``.
        weight_decay: weight decay of every group; None leaves the optimizer's default.
        weight_decay_norm: weight decay of normalisation-layer parameters (GroupNorm, LayerNorm,
            BatchNorm); None applies ``weight_decay`` to them too, as the authors do.
        optional_lr_multiplier_keys: keys of ``lr_multipliers`` that some models of the family do
            not have (e.g. ``"reference_points"``: a two-stage Deformable DETR takes its reference
            points from the encoder's proposals, not from a projection). A key that matches no
            parameter is warned about (a misspelt or renamed key would silently train at 1x),
            unless it is listed here.

    Returns:
        A list of dicts accepted by ``torch.optim`` optimizers, with keys ``params``, ``lr`` and
        optionally ``weight_decay``; empty groups are omitted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups_by_name: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(base_lr, (int, float)) or base_lr <= 0:
        raise ValueError(f"param_groups_by_name: base_lr must be a positive number, got {base_lr!r}")
    lr_multipliers = dict(lr_multipliers or {})
    for key, multiplier in lr_multipliers.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"param_groups_by_name: lr_multipliers keys must be non-empty strings, got {key!r}")
        if not isinstance(multiplier, (int, float)) or multiplier < 0:
            raise ValueError(f"param_groups_by_name: lr_multipliers[{key!r}] must be >= 0, got {multiplier!r}")

    if isinstance(optional_lr_multiplier_keys, str) or not all(
        isinstance(key, str) for key in optional_lr_multiplier_keys
    ):
        raise TypeError(
            "param_groups_by_name: optional_lr_multiplier_keys must be a list of strings, got "
            f"{optional_lr_multiplier_keys!r}"
        )

    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    norm_param_ids = set()
    for module in model.modules():
        if isinstance(module, norm_types):
            norm_param_ids.update(id(p) for p in module.parameters(recurse=False))

    groups: Dict[tuple, Dict[str, Any]] = {}
    matched_counts = {key: 0 for key in lr_multipliers}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        multiplier = 1.0
        for key, value in lr_multipliers.items():
            if key in name:
                multiplier = float(value)
                matched_counts[key] += 1
                break
        decay = weight_decay
        if weight_decay_norm is not None and id(param) in norm_param_ids:
            decay = weight_decay_norm
        group = groups.setdefault((multiplier, decay), {"params": [], "lr": base_lr * multiplier})
        if decay is not None:
            group["weight_decay"] = decay
        group["params"].append(param)

    optional = set(optional_lr_multiplier_keys)
    for key, count in matched_counts.items():
        if count == 0 and key in optional:
            logger.debug(f"param_groups_by_name: no parameter matches the optional key {key!r}")
        elif count == 0:
            logger.warning(
                f"param_groups_by_name: no trainable parameter name contains {key!r}, so its lr "
                "multiplier applies to nothing; check the key's spelling (or list it in "
                "optional_lr_multiplier_keys if this model has no such parameter)"
            )
    return list(groups.values())
