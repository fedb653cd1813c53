"""Converter of the SMCA-DETR authors' checkpoints.

The authors' state dicts are synthesised here from the key map of their code (the reference notes:
torchvision ResNet names, DETR's transformer names, ``point1..point4``, the released multi-scale
model's ``input_proj_*``, ``self_attn_8..64``, ``high_to_low``/``low_to_high``, ``conv_1/2``,
``transformer.conv``), independently of this package's modules, with random values so that every
tensor can be traced through the conversion.
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
    convert_official_smca_state_dict,
    detect_smca_variant,
    smca_config_name_for,
    smca_structure_overrides,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "modeling"))
from test_smca_detr import tiny_model_config  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import convert_official_smca as convert_tool  # noqa: E402

# --dynamic_scale -> values per head and level in point3 (type1 has no point3).
SCALE_WIDTHS = {"type1": 0, "type2": 1, "type3": 2, "type4": 3}
OUR_SCALE_TYPES = {
    "type1": "fixed",
    "type2": "single",
    "type3": "independent",
    "type4": "xy_product",
}


def official_state_dict(
    variant: str,
    depth: int = 18,
    d_model: int = 64,
    d_ffn: int = 128,
    n_heads: int = 4,
    num_encoder_layers: int = 2,
    num_decoder_layers: int = 2,
    num_queries: int = 10,
    num_classes: int = 91,
    dynamic_scale: str = "type3",
    kernel_size: int = 3,
    shared_cross: bool = True,
    random: bool = True,
):
    """The authors' layout: ``variant`` is "single_scale" (repository root) or "released_ms"
    (Multi_scale_SMCA.zip; ``shared_cross`` True = transformer_44_dot_4.py, False = transformer.py).
    """
    make = torch.randn if random else torch.zeros
    released = variant == "released_ms"
    levels = 4 if released else 1
    state = {}
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            state[f"backbone.0.body.{key}"] = make(value.shape)
    c3, c4, c5 = (128, 256, 512) if depth < 50 else (512, 1024, 2048)

    def conv(prefix, fan_out, fan_in, kernel):
        state[f"{prefix}.weight"] = make(fan_out, fan_in, kernel, kernel)
        state[f"{prefix}.bias"] = make(fan_out)

    def linear(prefix, fan_in, fan_out):
        state[f"{prefix}.weight"] = make(fan_out, fan_in)
        state[f"{prefix}.bias"] = make(fan_out)

    def norm(prefix):
        state[f"{prefix}.weight"] = make(d_model)
        state[f"{prefix}.bias"] = make(d_model)

    def attention(prefix):
        state[f"{prefix}.in_proj_weight"] = make(3 * d_model, d_model)
        state[f"{prefix}.in_proj_bias"] = make(3 * d_model)
        linear(f"{prefix}.out_proj", d_model, d_model)

    if released:
        conv("input_proj_512", d_model, c3, 1)
        conv("input_proj_1024", d_model, c4, 1)
        conv("input_proj_2048", d_model, c5, 1)
        conv("input_proj_2048_3", d_model, c5, 3)
        state["transformer.level_embed"] = make(4, d_model)
        conv("transformer.conv", d_model, d_model, 3)
    else:
        conv("input_proj", d_model, c5, 1)
    for i in range(num_encoder_layers):
        prefix = f"transformer.encoder.layers.{i}"
        if released:
            for name in ("self_attn_8", "self_attn_16", "self_attn_32", "self_attn_64"):
                conv(f"{prefix}.{name}", d_model, 1, kernel_size)
            suffixes = [""] if shared_cross else ["_1", "_2", "_3"]
            for suffix in suffixes:
                conv(f"{prefix}.high_to_low{suffix}", d_model, 1, kernel_size)
                conv(f"{prefix}.low_to_high{suffix}", d_model, 1, kernel_size)
            conv(f"{prefix}.conv_1", d_model, d_model, 1)
            conv(f"{prefix}.conv_2", d_model, d_model, 1)
        else:
            attention(f"{prefix}.self_attn")
        linear(f"{prefix}.linear1", d_model, d_ffn)
        linear(f"{prefix}.linear2", d_ffn, d_model)
        norm(f"{prefix}.norm1")
        norm(f"{prefix}.norm2")
    for i in range(num_decoder_layers):
        prefix = f"transformer.decoder.layers.{i}"
        attention(f"{prefix}.self_attn")
        attention(f"{prefix}.multihead_attn")
        linear(f"{prefix}.linear1", d_model, d_ffn)
        linear(f"{prefix}.linear2", d_ffn, d_model)
        for k in range(1, 5):
            norm(f"{prefix}.norm{k}")
        linear(f"{prefix}.point2", d_model, levels * n_heads * 2)
        if SCALE_WIDTHS[dynamic_scale]:
            linear(f"{prefix}.point3", d_model, levels * n_heads * SCALE_WIDTHS[dynamic_scale])
        if released:
            linear(f"{prefix}.point4", d_model, levels)
        if i == 0:
            linear(f"{prefix}.point1.layers.0", d_model, d_model)
            linear(f"{prefix}.point1.layers.1", d_model, d_model)
            linear(f"{prefix}.point1.layers.2", d_model, 2)
    norm("transformer.decoder.norm")
    linear("class_embed", d_model, num_classes + 1)  # + the "no-object" row
    linear("bbox_embed.layers.0", d_model, d_model)
    linear("bbox_embed.layers.1", d_model, d_model)
    linear("bbox_embed.layers.2", d_model, 4)
    state["query_embed.weight"] = make(num_queries, d_model)
    return {"model": state, "epoch": 49}


def our_config(
    variant: str, dynamic_scale: str = "type3", shared_cross: bool = True, num_classes=80
):
    config = tiny_model_config(variant)
    config.transformer.decoder.scale_type = OUR_SCALE_TYPES[dynamic_scale]
    if variant == "released_ms":
        config.transformer.encoder.share_cross_level_convs = shared_cross
    config.num_classes = num_classes
    return config


CASES = [
    ("single_scale", "type3", True),
    ("single_scale", "type1", True),
    ("single_scale", "type2", True),
    ("single_scale", "type4", True),
    ("released_ms", "type3", True),
    ("released_ms", "type3", False),
]


@pytest.mark.parametrize("variant, dynamic_scale, shared_cross", CASES)
def test_detects_variant(variant, dynamic_scale, shared_cross):
    detected = detect_smca_variant(
        official_state_dict(variant, dynamic_scale=dynamic_scale, shared_cross=shared_cross)
    )
    assert detected.name == ("released_multi_scale" if variant == "released_ms" else "single_scale")
    assert detected.scale_type == OUR_SCALE_TYPES[dynamic_scale]
    assert (detected.depth, detected.num_encoder_layers, detected.num_decoder_layers) == (18, 2, 2)
    assert (detected.num_classes, detected.num_queries) == (91, 10)
    assert (detected.encoder_ffn, detected.decoder_ffn) == (128, 128)
    if variant == "released_ms":
        assert (detected.kernel_size, detected.share_cross_level_convs) == (3, shared_cross)


@pytest.mark.parametrize("num_classes", [80, 91])
@pytest.mark.parametrize("variant, dynamic_scale, shared_cross", CASES)
def test_converted_loads_strictly_and_keeps_every_tensor(
    variant, dynamic_scale, shared_cross, num_classes
):
    official = official_state_dict(variant, dynamic_scale=dynamic_scale, shared_cross=shared_cross)[
        "model"
    ]
    model = instantiate(our_config(variant, dynamic_scale, shared_cross, num_classes))
    converted = convert_official_smca_state_dict(official, num_classes)
    check_fits_model(converted, model)
    model.load_state_dict(converted, strict=True)

    # Class rows: COCO category ids -> detectron2's contiguous ids for 80; kept for 91; the
    # no-object row (index 91) is gone either way.
    id_map = MetadataCatalog.get("coco_2017_train").thing_dataset_id_to_contiguous_id
    rows = {contiguous: dataset for dataset, contiguous in id_map.items()}
    for name in ("weight", "bias"):
        ours = getattr(model.class_embed, name)
        theirs = official[f"class_embed.{name}"]
        assert ours.shape[0] == num_classes
        for row in (0, 11, 79):
            torch.testing.assert_close(ours[row], theirs[rows[row] if num_classes == 80 else row])

    # Every other tensor of theirs appears, unchanged, exactly once among ours (the random values
    # identify it): nothing is dropped, swapped or duplicated.
    ours_by_value = {}
    for key, value in model.state_dict().items():
        if not key.startswith("class_embed."):
            signature = repr(value.flatten()[:4].tolist()) + str(tuple(value.shape))
            ours_by_value.setdefault(signature, []).append(key)
    for key, value in official.items():
        if key.startswith("class_embed."):
            continue
        signature = repr(value.flatten()[:4].tolist()) + str(tuple(value.shape))
        assert len(ours_by_value.get(signature, [])) == 1, key

    # Renames whose meaning differs between the layouts.
    decoder = model.transformer.decoder
    pairs = [
        (decoder.layers[1].self_attn_norm.weight, "transformer.decoder.layers.1.norm1.weight"),
        (decoder.layers[1].cross_attn_norm.weight, "transformer.decoder.layers.1.norm2.weight"),
        (decoder.layers[0].ffn_norm.bias, "transformer.decoder.layers.0.norm3.bias"),
        (decoder.layers[1].modulation_norm.bias, "transformer.decoder.layers.1.norm4.bias"),
        (
            decoder.layers[1].cross_attn.in_proj_weight,
            "transformer.decoder.layers.1.multihead_attn.in_proj_weight",
        ),
        (
            decoder.layers[1].cross_attn.centre_offsets.weight,
            "transformer.decoder.layers.1.point2.weight",
        ),
        (decoder.centre_head.layers[2].bias, "transformer.decoder.layers.0.point1.layers.2.bias"),
        (
            model.backbone.body.res3[0].shortcut.norm.running_var,
            "backbone.0.body.layer2.0.downsample.1.running_var",
        ),
    ]
    if dynamic_scale != "type1":
        pairs.append(
            (
                decoder.layers[0].cross_attn.gaussian_scales.bias,
                "transformer.decoder.layers.0.point3.bias",
            )
        )
    if variant == "released_ms":
        encoder = model.transformer.encoder.layers[1]
        pairs += [
            (
                decoder.layers[0].cross_attn.scale_weights.weight,
                "transformer.decoder.layers.0.point4.weight",
            ),
            (model.transformer.downsample_finest.weight, "transformer.conv.weight"),
            (model.backbone.input_proj[3][0].weight, "input_proj_2048_3.weight"),
            (model.backbone.input_proj[0][0].bias, "input_proj_512.bias"),
            (encoder.level_convs[2].weight, "transformer.encoder.layers.1.self_attn_32.weight"),
            (encoder.in_conv.weight, "transformer.encoder.layers.1.conv_1.weight"),
            (encoder.out_conv.bias, "transformer.encoder.layers.1.conv_2.bias"),
        ]
        if shared_cross:
            pairs.append(
                (encoder.down_convs[0].weight, "transformer.encoder.layers.1.high_to_low.weight")
            )
        else:
            pairs += [
                (encoder.down_convs[1].weight, "transformer.encoder.layers.1.high_to_low_2.weight"),
                (encoder.up_convs[2].bias, "transformer.encoder.layers.1.low_to_high_3.bias"),
            ]
    else:
        pairs.append((model.backbone.input_proj[0][0].weight, "input_proj.weight"))
    for ours, key in pairs:
        torch.testing.assert_close(ours, official[key], msg=key)


def test_structure_overrides_select_the_checkpoint_sizes():
    variant = detect_smca_variant(
        official_state_dict("released_ms", depth=50, d_model=256, random=False, shared_cross=False)
    )
    overrides = smca_structure_overrides(variant, 80)
    assert smca_config_name_for(variant) == "smca_detr_r50_released_ms_50ep.py"
    assert "model.transformer.encoder.num_layers=2" in overrides
    assert "model.transformer.encoder.kernel_size=3" in overrides
    assert "model.transformer.encoder.share_cross_level_convs=False" in overrides
    assert "model.num_queries=10" in overrides


def test_truncated_checkpoint_is_reported():
    official = official_state_dict("released_ms")["model"]
    del official["transformer.encoder.layers.1.conv_2.weight"]
    model = instantiate(our_config("released_ms"))
    with pytest.raises(ValueError, match="missing 1 .*encoder.layers.1.out_conv.weight"):
        check_fits_model(convert_official_smca_state_dict(official), model)


def test_foreign_checkpoints_are_rejected():
    # Plain DETR (no centre MLP), Deformable DETR (no point1 either) and unknown keys.
    detr = official_state_dict("single_scale")["model"]
    del detr["transformer.decoder.layers.0.point1.layers.0.weight"]
    with pytest.raises(ValueError, match="not an SMCA-DETR checkpoint"):
        detect_smca_variant(detr)
    official = official_state_dict("single_scale")["model"]
    official["transformer.decoder.layers.0.norm9.weight"] = torch.zeros(64)
    with pytest.raises(ValueError, match="norm9"):
        convert_official_smca_state_dict(official)
    official = official_state_dict("single_scale")["model"]
    with pytest.raises(ValueError, match="num_classes must be 80 or 91"):
        convert_official_smca_state_dict(official, num_classes=20)


def test_command_line_converts_r50_for_detectron2_checkpointer(tmp_path, capsys):
    official = official_state_dict(
        "single_scale",
        depth=50,
        d_model=256,
        d_ffn=2048,
        n_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        num_queries=300,
        random=False,
    )
    official["model"]["query_embed.weight"] = torch.randn(300, 256)
    source, target = tmp_path / "official.pth", tmp_path / "converted.pth"
    torch.save(official, source)
    assert convert_tool.main([str(source), str(target)]) == 0
    printed = capsys.readouterr().out
    assert "smca_detr_r50_single_scale_50ep.py" in printed and "model.num_classes=80" in printed

    cfg = LazyConfig.load("configs/smca_detr/smca_detr_r50_single_scale_50ep.py")
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
    truncated.pop("transformer.decoder.layers.3.point3.bias")
    torch.save({"model": truncated}, source)
    with pytest.raises(SystemExit, match="layers.3.cross_attn.gaussian_scales.bias"):
        convert_tool.main([str(source), str(target)])
