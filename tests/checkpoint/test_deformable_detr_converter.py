"""Converter of the authors' Deformable DETR checkpoints.

The official-layout state dicts are synthesised here from the documented key list of the authors'
code (torchvision ResNet names, their transformer names, their repeated/shared heads), independently
of this package's modules, with random values so that every tensor can be traced through the conversion.
"""

import os
import sys

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog

from deformable_family.checkpoint import (
    check_fits_model,
    convert_official_state_dict,
    detect_variant,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "modeling"))
from test_deformable_detr import VARIANTS, tiny_model_config  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import convert_official_deformable_detr as convert_tool  # noqa: E402


def official_state_dict(
    variant: str,
    depth: int = 18,
    d_model: int = 64,
    d_ffn: int = 128,
    n_heads: int = 4,
    n_points: int = 2,
    num_encoder_layers: int = 2,
    num_decoder_layers: int = 2,
    num_queries: int = 10,
    num_classes: int = 91,
    random: bool = True,
):
    """The authors' model layout (models/deformable_detr.py, deformable_transformer.py, backbone.py)."""
    make = torch.randn if random else torch.zeros
    two_stage = variant == "two_stage"
    refine = variant in ("box_refine", "two_stage")
    num_levels = 1 if variant == "single_scale" else 4
    state = {}
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            state[f"backbone.0.body.{key}"] = (
                make(value.shape) if value.is_floating_point() else value
            )
    stage_channels = [128, 256, 512] if depth < 50 else [512, 1024, 2048]
    in_channels = stage_channels[-1:] if num_levels == 1 else stage_channels + [stage_channels[-1]]
    for level, channels in enumerate(in_channels):
        kernel = 3 if level == 3 else 1
        state[f"input_proj.{level}.0.weight"] = make(d_model, channels, kernel, kernel)
        state[f"input_proj.{level}.0.bias"] = make(d_model)
        state[f"input_proj.{level}.1.weight"] = make(d_model)
        state[f"input_proj.{level}.1.bias"] = make(d_model)

    def linear(prefix, fan_in, fan_out):
        state[f"{prefix}.weight"] = make(fan_out, fan_in)
        state[f"{prefix}.bias"] = make(fan_out)

    def norm(prefix, dim):
        state[f"{prefix}.weight"] = make(dim)
        state[f"{prefix}.bias"] = make(dim)

    def deform_attn(prefix):
        linear(f"{prefix}.sampling_offsets", d_model, n_heads * num_levels * n_points * 2)
        linear(f"{prefix}.attention_weights", d_model, n_heads * num_levels * n_points)
        linear(f"{prefix}.value_proj", d_model, d_model)
        linear(f"{prefix}.output_proj", d_model, d_model)

    state["transformer.level_embed"] = make(num_levels, d_model)
    for i in range(num_encoder_layers):
        prefix = f"transformer.encoder.layers.{i}"
        deform_attn(f"{prefix}.self_attn")
        norm(f"{prefix}.norm1", d_model)
        linear(f"{prefix}.linear1", d_model, d_ffn)
        linear(f"{prefix}.linear2", d_ffn, d_model)
        norm(f"{prefix}.norm2", d_model)
    for i in range(num_decoder_layers):
        prefix = f"transformer.decoder.layers.{i}"
        deform_attn(f"{prefix}.cross_attn")
        norm(f"{prefix}.norm1", d_model)
        state[f"{prefix}.self_attn.in_proj_weight"] = make(3 * d_model, d_model)
        state[f"{prefix}.self_attn.in_proj_bias"] = make(3 * d_model)
        linear(f"{prefix}.self_attn.out_proj", d_model, d_model)
        norm(f"{prefix}.norm2", d_model)
        linear(f"{prefix}.linear1", d_model, d_ffn)
        linear(f"{prefix}.linear2", d_ffn, d_model)
        norm(f"{prefix}.norm3", d_model)
    if two_stage:
        linear("transformer.enc_output", d_model, d_model)
        norm("transformer.enc_output_norm", d_model)
        linear("transformer.pos_trans", 2 * d_model, 2 * d_model)
        norm("transformer.pos_trans_norm", 2 * d_model)
    else:
        linear("transformer.reference_points", d_model, 2)
        state["query_embed.weight"] = make(num_queries, 2 * d_model)

    num_predictions = num_decoder_layers + 1 if two_stage else num_decoder_layers
    for i in range(num_predictions):
        if refine or i == 0:
            linear(f"class_embed.{i}", d_model, num_classes)
            linear(f"bbox_embed.{i}.layers.0", d_model, d_model)
            linear(f"bbox_embed.{i}.layers.1", d_model, d_model)
            linear(f"bbox_embed.{i}.layers.2", d_model, 4)
        else:
            # nn.ModuleList([head] * n): every entry is the same module, the same tensors.
            for key in [k for k in state if k.startswith(("class_embed.0.", "bbox_embed.0."))]:
                head, _, rest = key.split(".", 2)
                state[f"{head}.{i}.{rest}"] = state[key]
    # Their decoder holds the same head modules again under a second name.
    duplicated = (["bbox_embed"] if refine else []) + (["class_embed"] if two_stage else [])
    for key in list(state):
        if key.split(".")[0] in duplicated:
            state[f"transformer.decoder.{key}"] = state[key]
    return {"model": state, "epoch": 49}


@pytest.mark.parametrize("variant", VARIANTS)
def test_detects_variant(variant):
    detected = detect_variant(official_state_dict(variant))
    assert detected.name == variant
    assert (detected.depth, detected.num_encoder_layers, detected.num_decoder_layers) == (18, 2, 2)
    assert detected.num_classes == 91


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_loads_strictly_and_keeps_every_tensor(variant):
    official = official_state_dict(variant)["model"]
    model = instantiate(tiny_model_config(variant))
    converted = convert_official_state_dict(official)
    check_fits_model(converted, model)
    model.load_state_dict(converted, strict=True)

    rows = {
        contiguous: dataset
        for dataset, contiguous in MetadataCatalog.get(
            "coco_2017_train"
        ).thing_dataset_id_to_contiguous_id.items()
    }
    num_layers = model.transformer.decoder.num_layers
    for i in range(num_layers if model.with_box_refine else 1):
        for name in ("weight", "bias"):
            ours = model.state_dict()[f"class_embed.{i}.{name}"]
            theirs = official[f"class_embed.{i}.{name}"]
            for contiguous in (0, 11, 79):
                torch.testing.assert_close(ours[contiguous], theirs[rows[contiguous]])
    if variant == "two_stage":
        torch.testing.assert_close(
            model.proposal_class_embed.weight[0], official[f"class_embed.{num_layers}.weight"][0]
        )
        torch.testing.assert_close(
            model.proposal_bbox_embed.layers[2].bias,
            official[f"bbox_embed.{num_layers}.layers.2.bias"],
        )

    # Every other tensor of theirs appears, unchanged, exactly once among ours (the random values
    # identify it): nothing is dropped, swapped or duplicated.
    ours_by_value = {}
    for key, value in model.state_dict().items():
        if not key.startswith(("class_embed.", "proposal_class_embed.")):
            ours_by_value.setdefault(
                value.flatten()[:4].tolist().__repr__() + str(tuple(value.shape)), []
            ).append(key)
    seen = set()
    for key, value in official.items():
        if key.startswith(("class_embed.", "transformer.decoder.class_embed.")) or key.endswith(
            "num_batches_tracked"
        ):
            continue
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        matches = ours_by_value.get(
            value.flatten()[:4].tolist().__repr__() + str(tuple(value.shape)), []
        )
        assert len(matches) == 1, key
    # Spot-check renames that differ in meaning between the two layouts.
    torch.testing.assert_close(
        model.transformer.decoder.layers[1].self_attn_norm.weight,
        official["transformer.decoder.layers.1.norm2.weight"],
    )
    torch.testing.assert_close(
        model.transformer.decoder.layers[0].cross_attn_norm.bias,
        official["transformer.decoder.layers.0.norm1.bias"],
    )
    torch.testing.assert_close(
        model.backbone.body.res3[0].shortcut.norm.running_var,
        official["backbone.0.body.layer2.0.downsample.1.running_var"],
    )


def test_truncated_checkpoint_is_reported():
    official = official_state_dict("box_refine")["model"]
    del official["transformer.encoder.layers.1.linear1.weight"]
    model = instantiate(tiny_model_config("box_refine"))
    with pytest.raises(ValueError, match="missing 1 .*encoder.layers.1.linear1.weight"):
        check_fits_model(convert_official_state_dict(official), model)


def test_foreign_checkpoint_is_rejected():
    with pytest.raises(ValueError, match="input_proj"):
        detect_variant({"model": {"backbone.0.body.conv1.weight": torch.zeros(1)}})
    official = official_state_dict("multi_scale")["model"]
    official["transformer.decoder.layers.0.norm9.weight"] = torch.zeros(64)
    with pytest.raises(ValueError, match="norm9"):
        convert_official_state_dict(official)


def test_command_line_converts_r50_for_detectron2_checkpointer(tmp_path, capsys):
    official = official_state_dict(
        "multi_scale",
        depth=50,
        d_model=256,
        d_ffn=1024,
        n_heads=8,
        n_points=4,
        num_encoder_layers=6,
        num_decoder_layers=6,
        num_queries=300,
    )
    source, target = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save(official, source)
    assert convert_tool.main([str(source), str(target)]) == 0
    assert "deformable_detr_r50_50ep.py" in capsys.readouterr().out

    cfg = LazyConfig.load("configs/deformable_detr/deformable_detr_r50_50ep.py")
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
