"""Convert the DSCT authors' checkpoints (Sampson-Lee/DSCT) to this package's :class:`DSCT`.

Their training checkpoints are ``{"model", "optimizer", "lr_scheduler", "epoch", "args"}`` with
``args`` an ``argparse.Namespace``. The model's state dict is a plain Deformable DETR's (backbone,
input_proj, transformer, ``query_embed`` = the 300 context queries) plus ``query_embed_dsct`` (the
subject queries), ``class_embed_dsct.{0-5}`` and ``bbox_embed_dsct.{0-5}`` (one head repeated for
the 6 decoder layers). The shared part goes through the Deformable DETR converter; the DSCT heads
become ``subject_class_embed`` / ``subject_bbox_embed`` / ``subject_query_embed``.
"""

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .deformable_detr import convert_official_state_dict

__all__ = [
    "DSCTVariant",
    "convert_official_dsct_state_dict",
    "detect_dsct_variant",
    "dsct_config_name_for",
    "load_official_checkpoint",
]

_DSCT_HEADS = ("class_embed_dsct", "bbox_embed_dsct")
_REQUIRED = (
    "query_embed_dsct.weight",
    "query_embed.weight",
    "class_embed_dsct.0.weight",
    "class_embed_dsct.0.bias",
    "bbox_embed_dsct.0.layers.0.weight",
    "transformer.reference_points.weight",
)


@dataclass(frozen=True)
class DSCTVariant:
    """What a DSCT checkpoint holds; the SSRA neighbours come from its ``args`` when present."""

    dataset: str  # "emotic" (26 emotions, multi-label) or "caer_s" (7 classes)
    num_emotions: int
    num_subject_queries: int
    num_context_queries: int
    num_spatial: Optional[int] = None
    num_semantic: Optional[int] = None


def load_official_checkpoint(path: str) -> Dict[str, Any]:
    """``torch.load`` of their file without running arbitrary code: ``weights_only=True`` with only
    ``argparse.Namespace`` (their pickled training arguments) allowed besides tensors and plain
    containers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError names the refused global
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True) and argparse.Namespace allowed: "
            f"{error}. Only tensors, plain containers and argparse.Namespace are accepted, so that "
            "loading runs no code from the file."
        ) from error


def _unwrap(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(
            "checkpoint must be a state dict or a dict with a non-empty 'model' state dict"
        )
    return dict(state_dict)


def _args_of(checkpoint: Mapping) -> Optional[argparse.Namespace]:
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    return args if isinstance(args, argparse.Namespace) else None


def detect_dsct_variant(checkpoint: Mapping) -> DSCTVariant:
    """Dataset from the class head width (27 logits: EMOTIC, 8: CAER-S), subject queries from
    ``query_embed_dsct``, SSRA neighbours from ``args.dec_n_sp`` / ``args.dec_n_sm``."""
    state_dict = _unwrap(checkpoint)
    missing = [key for key in _REQUIRED if key not in state_dict]
    if missing:
        raise ValueError(f"not a DSCT checkpoint: missing {missing}")
    num_logits = state_dict["class_embed_dsct.0.weight"].shape[0]
    datasets = {27: "emotic", 8: "caer_s"}
    if num_logits not in datasets:
        raise ValueError(
            f"class_embed_dsct has {num_logits} rows; DSCT has 27 (EMOTIC: 26 emotions + "
            "subject-ness) or 8 (CAER-S: 7 classes + 1)"
        )
    args = _args_of(checkpoint)
    return DSCTVariant(
        dataset=datasets[num_logits],
        num_emotions=num_logits - 1,
        num_subject_queries=state_dict["query_embed_dsct.weight"].shape[0],
        num_context_queries=state_dict["query_embed.weight"].shape[0],
        num_spatial=getattr(args, "dec_n_sp", None),
        num_semantic=getattr(args, "dec_n_sm", None),
    )


def dsct_config_name_for(variant: DSCTVariant) -> str:
    """The config in configs/dsct/ for this dataset."""
    return f"dsct_r50_{variant.dataset}_50ep.py"


def _shared_heads(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Check that every ``<head>_dsct.{i}`` equals ``.0`` (one head repeated per layer) and return
    the state dict with the heads under Deformable DETR's names, all indices sharing index 0's
    tensor (so that the Deformable DETR converter reads a non-refining model)."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(r"(class_embed_dsct|bbox_embed_dsct)\.(\d+)\.(.+)$", key)
        if not match:
            out[key] = value
            continue
        head, index, rest = match.groups()
        first = state_dict.get(f"{head}.0.{rest}")
        if first is None or first.shape != value.shape or not torch.equal(first, value):
            raise ValueError(
                f"{key} differs from {head}.0.{rest}: DSCT shares one {head} across decoder layers"
            )
        out[f"{head[: -len('_dsct')]}.{index}.{rest}"] = first
    return out


def convert_official_dsct_state_dict(
    checkpoint: Mapping,
) -> Tuple[Dict[str, torch.Tensor], DSCTVariant]:
    """Rename the authors' DSCT state dict to this package's :class:`DSCT`.

    Args:
        checkpoint: their ``torch.load`` result (a dict with "model") or the state dict itself.

    Returns:
        (state dict for ``DSCT``, a copy; the detected :class:`DSCTVariant`).

    Raises:
        ValueError listing what is missing or not part of DSCT.
    """
    variant = detect_dsct_variant(checkpoint)
    state_dict = _unwrap(checkpoint)
    subject_queries = state_dict["query_embed_dsct.weight"]
    unexpected = [
        key
        for key in state_dict
        if key.startswith(
            (
                "class_embed.",
                "bbox_embed.",
                "transformer.decoder.class_embed",
                "transformer.decoder.bbox_embed",
            )
        )
    ]
    if unexpected:
        raise ValueError(
            f"checkpoint has Deformable DETR detection heads, not part of DSCT: {unexpected[:10]}"
        )
    as_deformable_detr = _shared_heads(
        {key: value for key, value in state_dict.items() if key != "query_embed_dsct.weight"}
    )
    try:
        converted = convert_official_state_dict(
            as_deformable_detr, num_classes=variant.num_emotions + 1
        )
    except ValueError as error:
        raise ValueError(f"not a DSCT checkpoint: {error}") from error
    out: Dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key.startswith("class_embed.0."):
            out["subject_class_embed." + key[len("class_embed.0.") :]] = value
        elif key.startswith("bbox_embed.0."):
            out["subject_bbox_embed." + key[len("bbox_embed.0.") :]] = value
        else:
            out[key] = value
    out["subject_query_embed.weight"] = subject_queries.detach().clone()
    return out, variant
