"""Convert the AdaMixer / StageInteractor authors' mmdetection checkpoints to this package's names.

The authors' layout (MCG-NJU/AdaMixer, MCG-NJU/StageInteractor; mmdetection 2.12 / mmcv 1.3.3):
``backbone.*`` (mmdetection's ResNet, torchvision's names), ``neck.lateral_convs.{l}.conv.*`` and
``neck.gn_out.*`` (ChannelMapping), ``rpn_head.init_content_features.weight`` and
``rpn_head.init_proposal_bboxes[.weight]`` (query generator), ``roi_head.bbox_head.{s}.*`` (one
stage each). Class heads have 80 rows in mmdetection's COCO order, which is detectron2's.

Dropped, as dead in the authors' models: StageInteractor's ``dynamic_conv.subbox_score_list.*``
(a softmax over an axis of length 1: identically 1) and ``iou_snyc_statistics.*`` (buffers of an
unused SyncBatchNorm).
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .deformable_detr import _resnet_name

__all__ = [
    "OfficialAdaMixerVariant",
    "detect_adamixer_variant",
    "convert_official_adamixer_state_dict",
    "adamixer_config_for",
]

# Stage sub-modules present in both models: (their prefix, ours).
_COMMON_STAGE_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("iof_tau", "iof_tau"),
    ("attention.attn.", "self_attn."),
    ("attention_norm.", "self_attn_norm."),
    ("ffn.layers.0.0.", "ffn.0."),
    ("ffn.layers.1.", "ffn.2."),
    ("ffn_norm.", "ffn_norm."),
    ("cls_fcs.0.", "class_head.0."),
    ("cls_fcs.1.", "class_head.1."),
    ("fc_cls.", "class_head.3."),
    ("reg_fcs.0.", "box_head.0."),
    ("reg_fcs.1.", "box_head.1."),
    ("fc_reg.", "box_head.3."),
)
_ADAMIXER_STAGE_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("sampling_n_mixing.sampling_offset_generator.0.", "sampler.offsets."),
    ("sampling_n_mixing.norm.", "mixing_norm."),
    ("sampling_n_mixing.adaptive_mixing.parameter_generator.0.", "mixing.filter_generator."),
    ("sampling_n_mixing.adaptive_mixing.out_proj.", "mixing.out_proj."),
)
_STAGEINTERACTOR_STAGE_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("feat_extractor.gen_one_d.0.", "sampler.coarse_offsets."),
    ("feat_extractor.gen_double_d.0.", "sampler.fine_offsets."),
    ("dynamic_conv.parameter_generator.", "mixing.filter_generator."),
    ("dynamic_conv.mix_bias.", "mixing.bias_generator."),
    ("dynamic_conv.Wv.", "mixing.out_proj."),
    ("dynamic_conv.Wv_layer_norm.", "mixing_norm."),
    ("dynamic_conv.subbox_local_list.", "mixing.coarse_adapters."),
    ("dynamic_conv.axis_atten_list.", "mixing.fine_adapters."),
    ("dynamic_conv.M_score_list.", "mixing.channel_gates."),
    ("dynamic_conv.M_score_list_mix_bias.", "mixing.reused_bias_generator."),
    ("dynamic_conv.S_score_list.", "mixing.row_gates."),
    ("dynamic_conv.S_score_list2.", "mixing.point_gates."),
)
_STAGEINTERACTOR_DEAD = ("dynamic_conv.subbox_score_list.", "iou_snyc_statistics.")


@dataclass(frozen=True)
class OfficialAdaMixerVariant:
    """What a released checkpoint contains."""

    family: str  # "adamixer" or "stageinteractor"
    depth: int
    num_stages: int
    num_queries: int
    num_classes: int


def _unwrap(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("checkpoint must be a state dict or a dict with a non-empty 'state_dict'")
    return dict(state_dict)


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> List[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state_dict for m in [regex.match(key)] if m})


def _resnet_depth(state_dict: Mapping[str, torch.Tensor]) -> int:
    blocks = tuple(
        len(_indices(state_dict, rf"backbone\.layer{stage}\.(\d+)\.")) for stage in (1, 2, 3, 4)
    )
    bottleneck = any(".conv3." in key for key in state_dict if key.startswith("backbone."))
    depths = {(True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101}
    if (bottleneck, blocks) not in depths:
        raise ValueError(
            f"backbone.* is not a ResNet-50/101 (blocks per stage {blocks}); ResNeXt-DCN and Swin "
            "backbones are not supported"
        )
    return depths[(bottleneck, blocks)]


def detect_adamixer_variant(checkpoint: Mapping) -> OfficialAdaMixerVariant:
    """The model from the keys: ``sampling_n_mixing`` (AdaMixer) or ``dynamic_conv``
    (StageInteractor) in the stages; depth, stages, queries and classes from the shapes."""
    state_dict = _unwrap(checkpoint)
    stages = _indices(state_dict, r"roi_head\.bbox_head\.(\d+)\.")
    if not stages or "rpn_head.init_content_features.weight" not in state_dict:
        raise ValueError(
            "not an AdaMixer / StageInteractor checkpoint: no roi_head.bbox_head.{s}.* or "
            "rpn_head.init_content_features.weight keys"
        )
    if any(".sampling_n_mixing." in key for key in state_dict):
        family = "adamixer"
    elif any(".dynamic_conv." in key for key in state_dict):
        family = "stageinteractor"
    else:
        raise ValueError(
            "roi_head.bbox_head.0 has neither sampling_n_mixing.* (AdaMixer) nor dynamic_conv.* "
            "(StageInteractor) keys"
        )
    return OfficialAdaMixerVariant(
        family=family,
        depth=_resnet_depth(state_dict),
        num_stages=len(stages),
        num_queries=state_dict["rpn_head.init_content_features.weight"].shape[0],
        num_classes=state_dict["roi_head.bbox_head.0.fc_cls.weight"].shape[0],
    )


def adamixer_config_for(variant: OfficialAdaMixerVariant) -> Tuple[str, List[str]]:
    """The config (relative to ``configs/``) with this variant's structure and the overrides that
    give it the checkpoint's sizes."""
    schedule = "1x" if variant.depth == 50 and variant.num_queries == 100 else "3x"
    name = f"{variant.family}/{variant.family}_r{variant.depth}_{schedule}.py"
    default_queries = 100 if schedule == "1x" else 300
    overrides = []
    if variant.num_queries != default_queries:
        overrides.append(f"model.num_queries={variant.num_queries}")
    if variant.num_classes != 80:
        overrides.append(f"model.num_classes={variant.num_classes}")
    if variant.num_stages != 6:
        overrides.append(f"model.stages.num_stages={variant.num_stages}")
    return name, overrides


def _stage_name(rest: str, renames: Tuple[Tuple[str, str], ...]) -> Optional[str]:
    for theirs, ours in renames:
        if rest.startswith(theirs):
            return ours + rest[len(theirs) :]
    return None


def convert_official_adamixer_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """Rename the authors' state dict to this package's :class:`AdaMixer` (either model).

    Args:
        checkpoint: their ``torch.load`` result (a dict with "state_dict") or the state dict itself.

    Returns:
        the state dict for ``AdaMixer`` with the matching stages (a copy).

    Raises:
        ValueError listing the keys that belong to neither model.
    """
    state_dict = _unwrap(checkpoint)
    variant = detect_adamixer_variant(state_dict)
    stage_renames = _COMMON_STAGE_RENAMES + (
        _ADAMIXER_STAGE_RENAMES if variant.family == "adamixer" else _STAGEINTERACTOR_STAGE_RENAMES
    )
    converted: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    for key, value in state_dict.items():
        value = value.detach().clone()
        if key.startswith("backbone."):
            if key.startswith("backbone.fc."):
                unknown.append(key)
                continue
            try:
                converted["backbone.body." + _resnet_name(key[len("backbone.") :])] = value
            except ValueError:
                unknown.append(key)
            continue
        match = re.match(r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", key)
        if match:
            converted[f"backbone.input_proj.{match.group(1)}.0.{match.group(2)}"] = value
            continue
        if key in ("neck.gn_out.weight", "neck.gn_out.bias"):
            converted["backbone.shared_norm." + key.rsplit(".", 1)[1]] = value
            continue
        if key in ("rpn_head.init_proposal_bboxes.weight", "rpn_head.init_proposal_bboxes"):
            converted["initial_boxes"] = value
            continue
        if key == "rpn_head.init_content_features.weight":
            converted["query_content.weight"] = value
            continue
        match = re.match(r"roi_head\.bbox_head\.(\d+)\.(.+)$", key)
        if match:
            stage, rest = match.groups()
            if variant.family == "stageinteractor" and rest.startswith(_STAGEINTERACTOR_DEAD):
                continue
            name = _stage_name(rest, stage_renames)
            if name is None:
                unknown.append(key)
            else:
                converted[f"stages.{stage}.{name}"] = value
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(
            f"checkpoint has {len(unknown)} keys that are not part of {variant.family}: {unknown[:10]}"
        )
    return converted
