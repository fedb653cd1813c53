"""Converter of the authors' Deformable DETR checkpoints, tested against their key list.

``data/deformable_detr_official_keys.json`` is a dump of the names, shapes and shared tensors of
``model.state_dict()`` of the authors' four R50 models, built from their public code (see its
"about" field): a fact about their checkpoints, not a reading of their code shared with the
converter. Each test state dict gives every distinct tensor of theirs its own constant value, so
every converted tensor can be traced back to the key it came from.
"""

import json
import os
import re
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from deformable_family.checkpoint import (
    check_fits_model,
    config_name_for,
    convert_official_state_dict,
    detect_variant,
)
from deformable_family.checkpoint.deformable_detr import coco_category_rows

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
CONFIG_DIR = os.path.join(ROOT, "configs", "deformable_detr")
with open(os.path.join(HERE, "data", "deformable_detr_official_keys.json")) as f:
    MANIFEST = json.load(f)["variants"]
VARIANTS = ["single_scale", "multi_scale", "box_refine", "two_stage"]
# "shared": the repeated heads share storage, as torch.save keeps it in the authors' files;
# "copied": every key holds its own copy (a checkpoint re-saved through e.g. {k: v.clone()}).
LAYOUTS = ["shared", "copied"]
CONFIG_NAMES = {
    "single_scale": "deformable_detr_r50_single_scale_50ep.py",
    "multi_scale": "deformable_detr_r50_50ep.py",
    "box_refine": "deformable_detr_r50_box_refine_50ep.py",
    "two_stage": "deformable_detr_r50_two_stage_50ep.py",
}
_CLASS_HEAD = re.compile(r"(transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)$")

sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_official_deformable_detr as convert_tool  # noqa: E402


def source_ids(variant: str):
    """{authors' key: id of the distinct tensor it holds} (a key sharing another's tensor gets that id)."""
    ids = {}
    for index, (name, _, _, alias) in enumerate(MANIFEST[variant]["keys"]):
        ids[name] = ids[alias] if alias is not None else index
    return ids


def manifest_state_dict(variant: str, layout: str = "shared"):
    """The authors' checkpoint layout of ``variant``; the tensor with id k holds k * 1000, plus
    the row index in class heads (so the 91 -> 80 class mapping is visible)."""
    state = {}
    for index, (name, shape, dtype, alias) in enumerate(MANIFEST[variant]["keys"]):
        if alias is not None:
            state[name] = state[alias] if layout == "shared" else state[alias].clone()
            continue
        value = torch.full(shape, index * 1000.0, dtype=getattr(torch, dtype))
        if _CLASS_HEAD.match(name):
            value += torch.arange(shape[0], dtype=value.dtype).view(-1, *[1] * (len(shape) - 1))
        state[name] = value
    return {"model": state, "epoch": 49}


def build_on_meta(variant: str, num_classes: int = 80, proposal_num_classes=None):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, CONFIG_NAMES[variant]))
    overrides = [f"model.num_classes={num_classes}"]
    if proposal_num_classes is not None:
        overrides.append(f"model.proposal_num_classes={proposal_num_classes}")
    cfg = LazyConfig.apply_overrides(cfg, overrides)
    with torch.device("meta"):
        return instantiate(cfg.model)


def _id_of(value: torch.Tensor) -> int:
    """The id of a converted non-class tensor (all its elements hold id * 1000)."""
    first = float(value.flatten()[0])
    assert torch.all(value == first), "a converted tensor mixes values of several source tensors"
    assert first % 1000 == 0
    return int(first // 1000)


def test_manifest_counts_equal_the_configs_with_91_classes():
    """The dump is of the models the configs reproduce: the same number of parameters."""
    for variant in VARIANTS:
        model = build_on_meta(variant, num_classes=91)
        assert sum(p.numel() for p in model.parameters()) == MANIFEST[variant]["num_parameters"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_detects_variant(variant, layout):
    detected = detect_variant(manifest_state_dict(variant, layout))
    assert detected.name == variant
    assert (detected.depth, detected.num_encoder_layers, detected.num_decoder_layers) == (50, 6, 6)
    assert detected.num_levels == (1 if variant == "single_scale" else 4)
    assert detected.num_classes == 91
    assert config_name_for(detected) == CONFIG_NAMES[variant]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_fits_the_config_and_keeps_every_tensor_once(variant, layout):
    official = manifest_state_dict(variant, layout)["model"]
    ids = source_ids(variant)
    converted = convert_official_state_dict(official)
    model = build_on_meta(variant)
    check_fits_model(converted, model)
    model.load_state_dict(converted, strict=True, assign=True)  # torch's own key and shape check

    # Class heads: row c of ours is row coco_category_rows()[c] of theirs (91 COCO ids -> 80).
    rows = torch.tensor(coco_category_rows(), dtype=torch.float32)
    num_layers = 6
    refine = variant in ("box_refine", "two_stage")
    for i in range(num_layers if refine else 1):
        for kind in ("weight", "bias"):
            ours = converted[f"class_embed.{i}.{kind}"]
            expected = ids[f"class_embed.{i}.{kind}"] * 1000.0 + rows
            torch.testing.assert_close(
                ours, expected.view(-1, *[1] * (ours.dim() - 1)).expand_as(ours)
            )
    if variant == "two_stage":
        # The proposal head is their last class head, its rows kept in order (only row 0 is used).
        proposal = converted["proposal_class_embed.weight"]
        assert proposal.shape == (80, 256)
        expected = ids[f"class_embed.{num_layers}.weight"] * 1000.0 + torch.arange(80.0)
        torch.testing.assert_close(proposal, expected[:, None].expand_as(proposal))

    # Every other converted tensor is one of theirs, unchanged, and none is used twice.
    used = {}
    for key, value in converted.items():
        if key.startswith(("class_embed.", "proposal_class_embed.")):
            continue
        source = _id_of(value)
        assert source not in used, f"{key} and {used[source]} hold the same tensor of theirs"
        used[source] = key
    non_class_sources = {ids[name] for name in ids if not _CLASS_HEAD.match(name)}
    missing = sorted(name for name in ids if ids[name] in non_class_sources - set(used))
    assert not missing, f"their tensors dropped by the conversion: {missing[:5]}"

    # Renames whose meaning differs between the layouts (their decoder applies norm2 after the
    # self-attention, norm1 after the cross-attention, norm3 after the FFN; torchvision's layer2
    # is detectron2's res3).
    for ours, theirs in {
        "transformer.decoder.layers.1.self_attn_norm.weight": "transformer.decoder.layers.1.norm2.weight",
        "transformer.decoder.layers.0.cross_attn_norm.bias": "transformer.decoder.layers.0.norm1.bias",
        "transformer.decoder.layers.5.ffn_norm.weight": "transformer.decoder.layers.5.norm3.weight",
        "transformer.encoder.layers.2.norm2.bias": "transformer.encoder.layers.2.norm2.bias",
        "backbone.body.res3.0.shortcut.norm.running_var": "backbone.0.body.layer2.0.downsample.1.running_var",
        "backbone.body.res5.2.conv3.weight": "backbone.0.body.layer4.2.conv3.weight",
        "backbone.body.stem.conv1.norm.running_mean": "backbone.0.body.bn1.running_mean",
        "backbone.input_proj.0.1.weight": "input_proj.0.1.weight",
    }.items():
        assert _id_of(converted[ours]) == ids[theirs], ours
    last_box = f"bbox_embed.{num_layers - 1 if refine else 0}.layers.2.bias"
    assert _id_of(converted[last_box]) == ids[last_box]
    if variant == "two_stage":
        assert (
            _id_of(converted["proposal_bbox_embed.layers.2.bias"])
            == ids["bbox_embed.6.layers.2.bias"]
        )


def test_full_width_class_heads_keep_their_rows():
    official = manifest_state_dict("box_refine")["model"]
    converted = convert_official_state_dict(official, num_classes=91)
    check_fits_model(converted, build_on_meta("box_refine", num_classes=91))
    torch.testing.assert_close(converted["class_embed.3.bias"], official["class_embed.3.bias"])


def test_repeated_heads_that_differ_are_refused():
    """Without the decoder's head keys the file is not a refinement model, so its repeated heads
    must be equal: a mismatch is reported, not loaded into the wrong decoder."""
    official = manifest_state_dict("multi_scale", "copied")["model"]
    official["class_embed.3.weight"] = official["class_embed.3.weight"] + 1
    with pytest.raises(ValueError, match=r"class_embed\.3\.weight differs"):
        detect_variant(official)


def test_two_stage_without_refinement_is_refused():
    official = manifest_state_dict("two_stage")["model"]
    for key in [k for k in official if k.startswith("transformer.decoder.bbox_embed.")]:
        del official[key]
    with pytest.raises(ValueError, match="two-stage .* without box refinement"):
        detect_variant(official)


def test_truncated_checkpoint_is_reported():
    official = manifest_state_dict("box_refine")["model"]
    del official["transformer.encoder.layers.1.linear1.weight"]
    with pytest.raises(ValueError, match="missing 1 .*encoder.layers.1.linear1.weight"):
        check_fits_model(convert_official_state_dict(official), build_on_meta("box_refine"))


def test_foreign_checkpoint_is_rejected():
    with pytest.raises(ValueError, match="input_proj"):
        detect_variant({"model": {"backbone.0.body.conv1.weight": torch.zeros(1)}})
    official = manifest_state_dict("multi_scale")["model"]
    official["transformer.decoder.layers.0.norm9.weight"] = torch.zeros(256)
    with pytest.raises(ValueError, match="norm9"):
        convert_official_state_dict(official)


def test_command_line_converts_r50_for_detectron2_checkpointer(tmp_path, capsys):
    official = manifest_state_dict("multi_scale")
    source, target = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save(official, source)
    assert convert_tool.main([str(source), str(target)]) == 0
    assert "deformable_detr_r50_50ep.py" in capsys.readouterr().out

    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "deformable_detr_r50_50ep.py"))
    model = instantiate(cfg.model)
    checkpointer = DetectionCheckpointer(model)
    # load() logs incompatible keys without returning them: record what its _load_model step found
    # (the public load() path works on detectron2 v0.6 and main alike).
    found = []
    load_model = checkpointer._load_model
    checkpointer._load_model = lambda checkpoint: found.append(load_model(checkpoint)) or found[-1]
    checkpointer.load(str(target))
    (incompatible,) = found
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes
    torch.testing.assert_close(model.query_embed.weight, official["model"]["query_embed.weight"])

    truncated = dict(official["model"])
    truncated.pop("transformer.level_embed")
    torch.save({"model": truncated}, source)
    with pytest.raises(ValueError, match="transformer.level_embed"):
        convert_tool.main([str(source), str(target)])
