"""Convert the Deformable DETR authors' released checkpoints to this package's parameter names.

The authors' layout (fundamentalvision/Deformable-DETR): ``backbone.0.body.*`` (torchvision ResNet),
``input_proj.{i}.{0,1}``, ``transformer.{level_embed, reference_points, encoder.layers.{i}.*,
decoder.layers.{i}.*}``, ``class_embed.{i}``, ``bbox_embed.{i}.layers.{0,1,2}``, ``query_embed``;
two-stage adds ``transformer.{enc_output, enc_output_norm, pos_trans, pos_trans_norm}`` and a last
``class_embed`` / ``bbox_embed`` for the encoder proposals. Their class heads have 91 rows indexed by
COCO category id; detectron2 uses 80 contiguous ids.
"""

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch

__all__ = [
    "OfficialVariant",
    "detect_variant",
    "convert_official_state_dict",
    "coco_category_rows",
    "check_fits_model",
    "config_name_for",
]

# Decoder sub-module names: the authors number the norms by position (norm1 follows the
# cross-attention, norm2 the self-attention); ours say what they normalise.
_DECODER_RENAMES = {
    "cross_attn": "cross_attn",
    "norm1": "cross_attn_norm",
    "self_attn": "self_attn",
    "norm2": "self_attn_norm",
    "linear1": "linear1",
    "linear2": "linear2",
    "norm3": "ffn_norm",
}
_ENCODER_NAMES = {"self_attn", "norm1", "linear1", "linear2", "norm2"}
_TRANSFORMER_SHARED = (
    "level_embed",
    "reference_points",
    "enc_output",
    "enc_output_norm",
    "pos_trans",
    "pos_trans_norm",
)


@dataclass(frozen=True)
class OfficialVariant:
    """What a released checkpoint contains."""

    depth: int
    num_levels: int
    num_encoder_layers: int
    num_decoder_layers: int
    with_box_refine: bool
    two_stage: bool
    num_classes: int

    @property
    def name(self) -> str:
        if self.two_stage:
            return "two_stage"
        if self.with_box_refine:
            return "box_refine"
        return "single_scale" if self.num_levels == 1 else "multi_scale"


def _unwrap(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(
            "checkpoint must be a state dict or a dict with a non-empty 'model' state dict"
        )
    return dict(state_dict)


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> List[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state_dict for m in [regex.match(key)] if m})


def _resnet_depth(state_dict: Mapping[str, torch.Tensor]) -> int:
    blocks = tuple(
        len(_indices(state_dict, rf"backbone\.0\.body\.layer{stage}\.(\d+)\."))
        for stage in (1, 2, 3, 4)
    )
    bottleneck = any(".conv3." in key for key in state_dict if key.startswith("backbone.0.body."))
    depths = {
        (True, (3, 4, 6, 3)): 50,
        (True, (3, 4, 23, 3)): 101,
        (False, (2, 2, 2, 2)): 18,
        (False, (3, 4, 6, 3)): 34,
    }
    if (bottleneck, blocks) not in depths:
        raise ValueError(
            f"backbone.0.body.* is not a ResNet-18/34/50/101 (blocks per stage {blocks})"
        )
    return depths[(bottleneck, blocks)]


def _check_repeated_heads(state_dict: Mapping[str, torch.Tensor], heads: List[int]) -> None:
    """Without refinement the authors repeat one class head and one box head for every decoder
    layer (``nn.ModuleList([head] * n)``): every ``class_embed.{i}`` / ``bbox_embed.{i}`` must hold
    the values of entry 0, whether or not the file kept their shared storage."""
    for key, value in state_dict.items():
        match = re.match(r"(class_embed|bbox_embed)\.(\d+)\.(.+)$", key)
        if not match or match.group(2) == "0":
            continue
        first = state_dict.get(f"{match.group(1)}.0.{match.group(3)}")
        if first is None or first.shape != value.shape or not torch.equal(first, value):
            raise ValueError(
                f"{key} differs from {match.group(1)}.0.{match.group(3)}, but the checkpoint has no "
                "transformer.decoder.bbox_embed.* keys: it is neither the authors' layout without "
                "refinement (one head repeated per layer) nor their refinement layout (heads also "
                "registered under the decoder). Was it re-saved without some keys?"
            )


def detect_variant(checkpoint: Mapping) -> OfficialVariant:
    """Read the variant off the authors' structural keys: levels from the number of
    ``input_proj``, two-stage from ``transformer.enc_output``, box refinement from
    ``transformer.decoder.bbox_embed.*`` (their refinement model registers its per-layer box heads
    under the decoder too; without refinement the decoder has no box head).

    The tensors' storage is never looked at, so a checkpoint re-saved without shared storage is
    read the same. Without refinement, the repeated heads must hold equal values (else ValueError).
    """
    state_dict = _unwrap(checkpoint)
    num_levels = len(_indices(state_dict, r"input_proj\.(\d+)\."))
    if num_levels == 0:
        raise ValueError("not a Deformable DETR checkpoint: no input_proj.* keys")
    heads = _indices(state_dict, r"class_embed\.(\d+)\.weight$")
    if not heads:
        raise ValueError("not a Deformable DETR checkpoint: no class_embed.{i}.weight keys")
    num_decoder_layers = len(_indices(state_dict, r"transformer\.decoder\.layers\.(\d+)\."))
    num_encoder_layers = len(_indices(state_dict, r"transformer\.encoder\.layers\.(\d+)\."))
    two_stage = "transformer.enc_output.weight" in state_dict
    with_box_refine = any(key.startswith("transformer.decoder.bbox_embed.") for key in state_dict)
    if two_stage and not with_box_refine:
        raise ValueError(
            "the checkpoint is two-stage (transformer.enc_output.*) without box refinement (no "
            "transformer.decoder.bbox_embed.*): this package's two-stage model always refines boxes, "
            "as the authors' released two-stage model"
        )
    if not with_box_refine:
        _check_repeated_heads(state_dict, heads)
    return OfficialVariant(
        depth=_resnet_depth(state_dict),
        num_levels=num_levels,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        with_box_refine=with_box_refine,
        two_stage=two_stage,
        num_classes=state_dict["class_embed.0.weight"].shape[0],
    )


def config_name_for(variant: OfficialVariant) -> str:
    """The config in configs/deformable_detr/ with this variant's structure."""
    suffix = {
        "single_scale": "_single_scale",
        "multi_scale": "",
        "box_refine": "_box_refine",
        "two_stage": "_two_stage",
    }
    return f"deformable_detr_r{variant.depth}{suffix[variant.name]}_50ep.py"


def coco_category_rows() -> List[int]:
    """Row of the authors' 91-way head for each of detectron2's 80 contiguous COCO classes."""
    from detectron2.data import MetadataCatalog

    id_map = MetadataCatalog.get("coco_2017_train").thing_dataset_id_to_contiguous_id
    rows = [0] * len(id_map)
    for dataset_id, contiguous_id in id_map.items():
        rows[contiguous_id] = dataset_id
    return rows


def _resnet_name(name: str) -> str:
    """torchvision ResNet parameter name -> detectron2 ResNet name (``layer1`` is ``res2``)."""
    if name.startswith("conv1."):
        return "stem." + name
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name[len("bn1.") :]
    match = re.match(r"layer(\d)\.(\d+)\.(.+)$", name)
    if not match:
        raise ValueError(f"unexpected torchvision ResNet key backbone.0.body.{name}")
    stage, block, rest = int(match.group(1)), match.group(2), match.group(3)
    prefix = f"res{stage + 1}.{block}."
    for pattern, target in (
        (r"conv(\d)\.weight$", r"conv\1.weight"),
        (r"bn(\d)\.(.+)$", r"conv\1.norm.\2"),
        (r"downsample\.0\.weight$", "shortcut.weight"),
        (r"downsample\.1\.(.+)$", r"shortcut.norm.\1"),
    ):
        if re.match(pattern, rest):
            return prefix + re.sub(pattern, target, rest)
    raise ValueError(f"unexpected torchvision ResNet key backbone.0.body.{name}")


def _class_rows(weight: torch.Tensor, rows: Optional[List[int]]) -> torch.Tensor:
    return weight if rows is None else weight[rows]


def convert_official_state_dict(
    checkpoint: Mapping, num_classes: int = 80, proposal_num_classes: Optional[int] = None
) -> Dict[str, torch.Tensor]:
    """Rename the authors' state dict to this package's :class:`DeformableDETR`.

    Args:
        checkpoint: their ``torch.load`` result (a dict with "model") or the state dict itself.
        num_classes: 80 maps the 91 rows (COCO category ids) to detectron2's contiguous classes;
            the checkpoint's own width keeps the rows as they are.
        proposal_num_classes: width of our two-stage proposal head; None (the configs' default)
            means ``num_classes``. Only the first logit of the authors' proposal head is used (the
            foreground score), so their first rows are kept, never remapped: 1 keeps just row 0.

    Returns:
        the state dict for ``DeformableDETR`` (a copy; tensors are not shared with the input).
    """
    state_dict = _unwrap(checkpoint)
    variant = detect_variant(state_dict)
    if proposal_num_classes is None:
        proposal_num_classes = num_classes
    if num_classes == variant.num_classes:
        rows = None
    elif num_classes == 80 and variant.num_classes == 91:
        rows = coco_category_rows()
    else:
        raise ValueError(
            f"num_classes must be 80 or {variant.num_classes} for this checkpoint, got {num_classes}"
        )
    if variant.two_stage and not 1 <= proposal_num_classes <= variant.num_classes:
        raise ValueError(
            f"proposal_num_classes must be in [1, {variant.num_classes}], got {proposal_num_classes}"
        )

    converted: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    num_layers = variant.num_decoder_layers
    for key, value in state_dict.items():
        value = value.detach().clone()
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone.0.body."):
            converted["backbone.body." + _resnet_name(key[len("backbone.0.body.") :])] = value
        elif key.startswith("input_proj."):
            converted["backbone." + key] = value
        elif key.startswith("transformer.decoder.class_embed.") or key.startswith(
            "transformer.decoder.bbox_embed."
        ):
            # The authors also register the heads under the decoder (one module, two names): the
            # copies under the model are kept, these dropped.
            continue
        elif key.startswith("transformer.encoder.layers."):
            match = re.match(r"transformer\.encoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
            if not match or match.group(2) not in _ENCODER_NAMES:
                unknown.append(key)
                continue
            converted[key] = value
        elif key.startswith("transformer.decoder.layers."):
            match = re.match(r"transformer\.decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
            if not match or match.group(2) not in _DECODER_RENAMES:
                unknown.append(key)
                continue
            layer, module, rest = match.groups()
            converted[f"transformer.decoder.layers.{layer}.{_DECODER_RENAMES[module]}.{rest}"] = (
                value
            )
        elif key.startswith("transformer.") and key.split(".")[1] in _TRANSFORMER_SHARED:
            converted[key] = value
        elif key == "query_embed.weight":
            converted[key] = value
        elif key.startswith(("class_embed.", "bbox_embed.")):
            head, index, rest = key.split(".", 2)
            index = int(index)
            if variant.two_stage and index == num_layers:
                if head == "class_embed":
                    value = value[:proposal_num_classes]
                converted[f"proposal_{head}.{rest}"] = value
            elif variant.with_box_refine or index == 0:
                if head == "class_embed":
                    value = _class_rows(value, rows)
                converted[f"{head}.{index}.{rest}"] = value
            # else: a repeat of the shared head, counted once.
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"checkpoint has keys that are not part of Deformable DETR: {unknown[:10]}"
        )
    return converted


def check_fits_model(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key of ``state_dict``
    against ``model.state_dict()`` (buffers included; works on a model built on the meta device)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(expected[key].shape) != tuple(state_dict[key].shape)
    )
    if missing or unexpected or shapes:
        raise ValueError(
            "converted checkpoint does not fit the model: "
            f"missing {len(missing)} {missing[:10]}, unexpected {len(unexpected)} {unexpected[:10]}, "
            f"shape mismatches {shapes[:10]}"
        )
