"""Convert the SMCA-DETR authors' checkpoints (github.com/gaopengcuhk/SMCA-DETR) to :class:`SMCADETR`.

Two layouts exist:
- single scale (the repository root): ``backbone.0.body.*`` (torchvision ResNet), ``input_proj``,
  ``transformer.encoder.layers.{i}.*`` (DETR's), ``transformer.decoder.layers.{i}.*`` with
  ``multihead_attn``, ``norm1..norm4``, ``point2`` (offsets), ``point3`` (scales) and, in layer 0,
  ``point1`` (the centre MLP), ``transformer.decoder.norm``, ``class_embed``, ``bbox_embed``,
  ``query_embed``;
- the released multi-scale model (``Multi_scale_SMCA.zip``): ``input_proj_{512,1024,2048}`` (1x1) and
  ``input_proj_2048_3`` (3x3 stride 2 on C5), ``transformer.level_embed``, ``transformer.conv``, the
  convolutional encoder (``self_attn_{8,16,32,64}``, ``high_to_low[_k]``, ``low_to_high[_k]``,
  ``conv_1``, ``conv_2``, FFN, norms) and the decoder with ``point4`` (scale selection) as well.
Their class head has num_classes + 1 rows (the last a "no-object" logit never trained as positive):
it is dropped, and the 91 COCO-id rows map to detectron2's 80 contiguous classes.
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch

from .deformable_detr import _indices, _resnet_depth, _resnet_name, _unwrap, coco_category_rows

__all__ = [
    "OfficialSMCAVariant",
    "detect_smca_variant",
    "convert_official_smca_state_dict",
    "smca_config_name_for",
    "smca_structure_overrides",
]

# Scale variant from the width of point3 per head and level (the authors' --dynamic_scale).
_SCALE_TYPES_BY_WIDTH = {1: "single", 2: "independent", 3: "xy_product"}

_ENCODER_NAMES = {"self_attn", "linear1", "linear2", "norm1", "norm2"}
_CONV_ENCODER_RENAMES = {
    "conv_1": "in_conv",
    "conv_2": "out_conv",
    "linear1": "linear1",
    "linear2": "linear2",
    "norm1": "norm1",
    "norm2": "norm2",
}
# Decoder module names: theirs number the norms by position; ours say what they normalise.
_DECODER_RENAMES = {
    "self_attn": "self_attn",
    "norm1": "self_attn_norm",
    "norm2": "cross_attn_norm",
    "norm3": "ffn_norm",
    "norm4": "modulation_norm",
    "linear1": "linear1",
    "linear2": "linear2",
    "point2": "cross_attn.centre_offsets",
    "point3": "cross_attn.gaussian_scales",
    "point4": "cross_attn.scale_weights",
}
# The released model's levels at strides 8, 16, 32, 64 (the decoder's 4 maps follow this order).
_RELEASED_LEVEL_NAMES = ("8", "16", "32", "64")
_RELEASED_INPUT_PROJ = ("input_proj_512", "input_proj_1024", "input_proj_2048", "input_proj_2048_3")


@dataclass(frozen=True)
class OfficialSMCAVariant:
    """What an SMCA-DETR checkpoint of the authors contains."""

    name: str  # "single_scale" or "released_multi_scale"
    depth: int
    num_classes: int  # foreground classes (their head has one more row)
    num_queries: int
    num_encoder_layers: int
    num_decoder_layers: int
    encoder_ffn: int
    decoder_ffn: int
    num_levels: int
    scale_type: str
    kernel_size: Optional[int] = None  # released multi-scale encoder only
    share_cross_level_convs: Optional[bool] = None  # released multi-scale encoder only


def detect_smca_variant(checkpoint: Mapping) -> OfficialSMCAVariant:
    """Read the variant off the keys and shapes (layout, ResNet depth, layer counts, FFN widths,
    scale type, the encoder's kernel size and cross-level sharing)."""
    state_dict = _unwrap(checkpoint)
    if "transformer.decoder.layers.0.point1.layers.0.weight" not in state_dict:
        raise ValueError(
            "not an SMCA-DETR checkpoint: no transformer.decoder.layers.0.point1.* (the centre MLP)"
        )
    if "class_embed.weight" not in state_dict or "query_embed.weight" not in state_dict:
        raise ValueError("not an SMCA-DETR checkpoint: no class_embed.weight or query_embed.weight")
    released = "input_proj_2048_3.weight" in state_dict
    if not released and "input_proj.weight" not in state_dict:
        raise ValueError(
            "not an SMCA-DETR checkpoint: neither input_proj.weight (single scale) nor "
            "input_proj_2048_3.weight (released multi-scale)"
        )
    num_levels = len(_RELEASED_LEVEL_NAMES) if released else 1
    num_encoder_layers = len(_indices(state_dict, r"transformer\.encoder\.layers\.(\d+)\."))
    num_decoder_layers = len(_indices(state_dict, r"transformer\.decoder\.layers\.(\d+)\."))
    num_heads = state_dict["transformer.decoder.layers.0.point2.weight"].shape[0] // (
        2 * num_levels
    )
    point3 = state_dict.get("transformer.decoder.layers.0.point3.weight")
    if point3 is None:
        scale_type = "fixed"
    else:
        width = point3.shape[0] // (num_heads * num_levels)
        if width not in _SCALE_TYPES_BY_WIDTH or width * num_heads * num_levels != point3.shape[0]:
            raise ValueError(
                f"transformer.decoder.layers.0.point3.weight has {point3.shape[0]} rows: not a "
                f"scale variant for {num_heads} heads and {num_levels} levels"
            )
        scale_type = _SCALE_TYPES_BY_WIDTH[width]
    kernel_size = share = None
    if released:
        kernel_size = state_dict["transformer.encoder.layers.0.self_attn_8.weight"].shape[-1]
        share = "transformer.encoder.layers.0.high_to_low.weight" in state_dict
    return OfficialSMCAVariant(
        name="released_multi_scale" if released else "single_scale",
        depth=_resnet_depth(state_dict),
        num_classes=state_dict["class_embed.weight"].shape[0] - 1,
        num_queries=state_dict["query_embed.weight"].shape[0],
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        encoder_ffn=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn=state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        num_levels=num_levels,
        scale_type=scale_type,
        kernel_size=kernel_size,
        share_cross_level_convs=share,
    )


def smca_config_name_for(variant: OfficialSMCAVariant) -> str:
    """The config in configs/smca_detr/ with this variant's structure (before overrides)."""
    if variant.name == "released_multi_scale":
        return "smca_detr_r50_released_ms_50ep.py"
    return f"smca_detr_r{variant.depth}_single_scale_50ep.py"


def smca_structure_overrides(variant: OfficialSMCAVariant, num_classes: int) -> List[str]:
    """Config overrides that give :func:`smca_config_name_for`'s config this checkpoint's sizes
    (only the class count for the released models)."""
    if variant.name == "released_multi_scale":
        defaults = dict(depth=50, enc=6, ffn=1024, kernel=7, share=True)
    else:
        defaults = dict(depth=variant.depth, enc=6, ffn=2048, kernel=None, share=None)
    overrides = [f"model.num_classes={num_classes}"]
    if variant.depth != defaults["depth"]:
        overrides.append(f"model.backbone.depth={variant.depth}")
    if variant.num_queries != 300:
        overrides.append(f"model.num_queries={variant.num_queries}")
    if variant.num_encoder_layers != defaults["enc"]:
        overrides.append(f"model.transformer.encoder.num_layers={variant.num_encoder_layers}")
    if variant.num_decoder_layers != 6:
        overrides.append(f"model.transformer.decoder.num_layers={variant.num_decoder_layers}")
    if variant.encoder_ffn != defaults["ffn"]:
        overrides.append(f"model.transformer.encoder.d_ffn={variant.encoder_ffn}")
    if variant.decoder_ffn != defaults["ffn"]:
        overrides.append(f"model.transformer.decoder.d_ffn={variant.decoder_ffn}")
    if variant.scale_type != "independent":
        overrides.append(f"model.transformer.decoder.scale_type={variant.scale_type}")
    if variant.kernel_size is not None and variant.kernel_size != defaults["kernel"]:
        overrides.append(f"model.transformer.encoder.kernel_size={variant.kernel_size}")
    if variant.share_cross_level_convs is not None and (
        variant.share_cross_level_convs != defaults["share"]
    ):
        overrides.append(
            "model.transformer.encoder.share_cross_level_convs="
            f"{variant.share_cross_level_convs}"
        )
    return overrides


def _encoder_key(key: str, released: bool) -> Optional[str]:
    match = re.match(r"transformer\.encoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
    if not match:
        return None
    layer, module, rest = match.groups()
    prefix = f"transformer.encoder.layers.{layer}."
    if not released:
        return prefix + f"{module}.{rest}" if module in _ENCODER_NAMES else None
    if module in _CONV_ENCODER_RENAMES:
        return prefix + f"{_CONV_ENCODER_RENAMES[module]}.{rest}"
    level = re.match(r"self_attn_(\d+)$", module)
    if level and level.group(1) in _RELEASED_LEVEL_NAMES:
        return prefix + f"level_convs.{_RELEASED_LEVEL_NAMES.index(level.group(1))}.{rest}"
    cross = re.match(r"(high_to_low|low_to_high)(?:_(\d))?$", module)
    if cross:
        target = "down_convs" if cross.group(1) == "high_to_low" else "up_convs"
        pair = 0 if cross.group(2) is None else int(cross.group(2)) - 1
        return prefix + f"{target}.{pair}.{rest}"
    return None


def _decoder_key(key: str) -> Optional[str]:
    match = re.match(r"transformer\.decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
    if not match:
        return None
    layer, module, rest = match.groups()
    if module == "point1":
        return f"transformer.decoder.centre_head.{rest}" if layer == "0" else None
    if module == "multihead_attn":
        return f"transformer.decoder.layers.{layer}.cross_attn.{rest}"
    if module in _DECODER_RENAMES:
        return f"transformer.decoder.layers.{layer}.{_DECODER_RENAMES[module]}.{rest}"
    return None


def convert_official_smca_state_dict(
    checkpoint: Mapping, num_classes: int = 80
) -> Dict[str, torch.Tensor]:
    """Rename the authors' state dict to this package's :class:`SMCADETR`.

    Args:
        checkpoint: their ``torch.load`` result (a dict with "model") or the state dict itself.
        num_classes: 80 maps the 91 COCO-id rows to detectron2's contiguous classes; the
            checkpoint's own class count (91 for COCO) keeps the rows. The extra "no-object" row is
            dropped either way.

    Returns:
        the state dict for ``SMCADETR`` (a copy; tensors are not shared with the input).

    Raises:
        ValueError listing the keys that are not part of the detected variant.
    """
    state_dict = _unwrap(checkpoint)
    variant = detect_smca_variant(state_dict)
    released = variant.name == "released_multi_scale"
    if num_classes == variant.num_classes:
        rows: Optional[List[int]] = list(range(num_classes))
    elif num_classes == 80 and variant.num_classes == 91:
        rows = coco_category_rows()
    else:
        raise ValueError(
            f"num_classes must be 80 or {variant.num_classes} for this checkpoint, got {num_classes}"
        )

    converted: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    for key, value in state_dict.items():
        value = value.detach().clone()
        new_key: Optional[str] = None
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone.0.body."):
            new_key = "backbone.body." + _resnet_name(key[len("backbone.0.body.") :])
        elif key.startswith("input_proj") and "." in key:
            module, rest = key.split(".", 1)
            if not released and module == "input_proj":
                new_key = f"backbone.input_proj.0.0.{rest}"
            elif released and module in _RELEASED_INPUT_PROJ:
                new_key = f"backbone.input_proj.{_RELEASED_INPUT_PROJ.index(module)}.0.{rest}"
        elif key.startswith("transformer.encoder.layers."):
            new_key = _encoder_key(key, released)
        elif key.startswith("transformer.decoder.layers."):
            new_key = _decoder_key(key)
        elif key.startswith("transformer.decoder.norm."):
            new_key = key
        elif released and key == "transformer.level_embed":
            new_key = key
        elif released and key.startswith("transformer.conv."):
            new_key = "transformer.downsample_finest." + key[len("transformer.conv.") :]
        elif key in ("query_embed.weight",) or key.startswith("bbox_embed.layers."):
            new_key = key
        elif key in ("class_embed.weight", "class_embed.bias"):
            new_key = key
            value = value[rows]  # drops the no-object row, maps COCO ids when asked
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = value
    if unknown:
        raise ValueError(
            f"checkpoint has {len(unknown)} keys that are not part of SMCA-DETR "
            f"({variant.name}): {unknown[:10]}"
        )
    return converted
