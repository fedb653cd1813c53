"""The AdaMixer / StageInteractor converter on state dicts built from the reference's key map
(shared/reference/adamixer_stageinteractor.md, "State-dict keys"), on the meta device."""
import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.config import LazyConfig, instantiate

from deformable_family.checkpoint import check_fits_model
from deformable_family.checkpoint.adamixer import (
    adamixer_config_for,
    convert_official_adamixer_state_dict,
    detect_adamixer_variant,
)

META = torch.device("meta")


def backbone_and_neck(depth: int = 50):
    """mmdetection's ResNet keys are torchvision's minus fc.*; ChannelMapping's laterals and gn_out."""
    with META:
        resnet = getattr(torchvision.models, f"resnet{depth}")()
    keys = {f"backbone.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    for level, channels in enumerate((256, 512, 1024, 2048)):
        keys[f"neck.lateral_convs.{level}.conv.weight"] = torch.empty(
            256, channels, 1, 1, device=META
        )
        keys[f"neck.lateral_convs.{level}.conv.bias"] = torch.empty(256, device=META)
    keys["neck.gn_out.weight"] = torch.empty(256, device=META)
    keys["neck.gn_out.bias"] = torch.empty(256, device=META)
    return keys


COMMON_STAGE_SHAPES = {
    "iof_tau": (8,),
    "fc_cls.weight": (80, 256),
    "fc_cls.bias": (80,),
    "fc_reg.weight": (4, 256),
    "fc_reg.bias": (4,),
    "attention.attn.in_proj_weight": (768, 256),
    "attention.attn.in_proj_bias": (768,),
    "attention.attn.out_proj.weight": (256, 256),
    "attention.attn.out_proj.bias": (256,),
    "attention_norm.weight": (256,),
    "attention_norm.bias": (256,),
    "ffn.layers.0.0.weight": (2048, 256),
    "ffn.layers.0.0.bias": (2048,),
    "ffn.layers.1.weight": (256, 2048),
    "ffn.layers.1.bias": (256,),
    "ffn_norm.weight": (256,),
    "ffn_norm.bias": (256,),
    "cls_fcs.0.weight": (256, 256),
    "cls_fcs.0.bias": (256,),
    "cls_fcs.1.weight": (256,),
    "cls_fcs.1.bias": (256,),
    "reg_fcs.0.weight": (256, 256),
    "reg_fcs.0.bias": (256,),
    "reg_fcs.1.weight": (256,),
    "reg_fcs.1.bias": (256,),
}


def adamixer_state_dict(num_queries: int = 100):
    keys = backbone_and_neck()
    keys["rpn_head.init_proposal_bboxes.weight"] = torch.empty(num_queries, 4, device=META)
    keys["rpn_head.init_content_features.weight"] = torch.empty(num_queries, 256, device=META)
    stage_shapes = dict(COMMON_STAGE_SHAPES)
    stage_shapes.update(
        {
            "sampling_n_mixing.sampling_offset_generator.0.weight": (384, 256),
            "sampling_n_mixing.sampling_offset_generator.0.bias": (384,),
            "sampling_n_mixing.norm.weight": (256,),
            "sampling_n_mixing.norm.bias": (256,),
            "sampling_n_mixing.adaptive_mixing.parameter_generator.0.weight": (32768, 256),
            "sampling_n_mixing.adaptive_mixing.parameter_generator.0.bias": (32768,),
            "sampling_n_mixing.adaptive_mixing.out_proj.weight": (256, 32768),
            "sampling_n_mixing.adaptive_mixing.out_proj.bias": (256,),
        }
    )
    for stage in range(6):
        for name, shape in stage_shapes.items():
            keys[f"roi_head.bbox_head.{stage}.{name}"] = torch.empty(shape, device=META)
    return keys


def stageinteractor_state_dict(num_queries: int = 100):
    keys = backbone_and_neck()
    keys["rpn_head.init_proposal_bboxes"] = torch.empty(num_queries, 4, device=META)
    keys["rpn_head.init_content_features.weight"] = torch.empty(num_queries, 256, device=META)
    for stage in range(6):
        shapes = dict(COMMON_STAGE_SHAPES)
        generator_rows = {0: 49152, 1: 32768}.get(stage, 24576)
        shapes.update(
            {
                "dynamic_conv.mix_bias.weight": (768, 256),
                "dynamic_conv.mix_bias.bias": (768,),
                "dynamic_conv.parameter_generator.weight": (generator_rows, 256),
                "dynamic_conv.parameter_generator.bias": (generator_rows,),
                "dynamic_conv.Wv.weight": (256, 32768),
                "dynamic_conv.Wv.bias": (256,),
                "dynamic_conv.Wv_layer_norm.weight": (256,),
                "dynamic_conv.Wv_layer_norm.bias": (256,),
                "feat_extractor.gen_one_d.0.weight": (96 if stage == 0 else 48, 256),
                "feat_extractor.gen_one_d.0.bias": (96 if stage == 0 else 48,),
                "feat_extractor.gen_double_d.0.weight": (24, 256),
                "feat_extractor.gen_double_d.0.bias": (24,),
                "iou_snyc_statistics.running_mean": (1,),
                "iou_snyc_statistics.running_var": (1,),
                "iou_snyc_statistics.num_batches_tracked": (),
            }
        )
        if stage >= 2:
            for j in range(stage - 1):
                shapes[f"dynamic_conv.subbox_local_list.{j}.weight"] = (512, 512)
                shapes[f"dynamic_conv.subbox_local_list.{j}.bias"] = (512,)
                shapes[f"dynamic_conv.axis_atten_list.{j}.weight"] = (256, 256)
                shapes[f"dynamic_conv.axis_atten_list.{j}.bias"] = (256,)
                shapes[f"dynamic_conv.subbox_score_list.{j}.weight"] = (128, 256)
                shapes[f"dynamic_conv.subbox_score_list.{j}.bias"] = (128,)
            shapes.update(
                {
                    "dynamic_conv.M_score_list.weight": (512 * (stage - 1), 256),
                    "dynamic_conv.M_score_list.bias": (512 * (stage - 1),),
                    "dynamic_conv.M_score_list_mix_bias.weight": (256 * (stage - 1), 256),
                    "dynamic_conv.M_score_list_mix_bias.bias": (256 * (stage - 1),),
                    "dynamic_conv.S_score_list.weight": (256, 256),
                    "dynamic_conv.S_score_list.bias": (256,),
                    "dynamic_conv.S_score_list2.weight": (128, 256),
                    "dynamic_conv.S_score_list2.bias": (128,),
                }
            )
        for name, shape in shapes.items():
            keys[f"roi_head.bbox_head.{stage}.{name}"] = torch.empty(shape, device=META)
    return keys


BUILDERS = {"adamixer": adamixer_state_dict, "stageinteractor": stageinteractor_state_dict}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_reference_key_map_converts_and_fits_the_r50_config(family):
    theirs = {"state_dict": BUILDERS[family](), "meta": {"epoch": 12}}
    variant = detect_adamixer_variant(theirs)
    assert (variant.family, variant.depth, variant.num_stages, variant.num_queries) == (
        family,
        50,
        6,
        100,
    )
    config_name, overrides = adamixer_config_for(variant)
    assert config_name == f"{family}/{family}_r50_1x.py" and overrides == []
    converted = convert_official_adamixer_state_dict(theirs)
    with META:
        model = instantiate(LazyConfig.load(f"configs/{config_name}").model)
    check_fits_model(converted, model)
    dropped = set(theirs["state_dict"]) - {
        k for k in theirs["state_dict"] if "subbox_score" not in k and "iou_snyc" not in k
    }
    assert len(converted) == len(theirs["state_dict"]) - len(dropped)
    if family == "stageinteractor":
        # 10 dead score layers (weight + bias) and 6 x 3 statistics buffers.
        assert len(dropped) == 10 * 2 + 6 * 3


def test_300_queries_and_r101_pick_the_3x_configs():
    theirs = adamixer_state_dict(num_queries=300)
    assert adamixer_config_for(detect_adamixer_variant(theirs)) == (
        "adamixer/adamixer_r50_3x.py",
        [],
    )
    with META:
        resnet101 = torchvision.models.resnet101()
    theirs = {
        k: v for k, v in stageinteractor_state_dict().items() if not k.startswith("backbone.")
    }
    theirs.update(
        {f"backbone.{k}": v for k, v in resnet101.state_dict().items() if not k.startswith("fc.")}
    )
    variant = detect_adamixer_variant(theirs)
    assert variant.depth == 101
    assert adamixer_config_for(variant) == (
        "stageinteractor/stageinteractor_r101_3x.py",
        ["model.num_queries=100"],
    )


def test_values_land_on_the_matching_parameters():
    """Small real tensors on a few keys of each kind: each value arrives unchanged under our name."""
    theirs = {
        k: torch.randn(v.shape) if v.dim() <= 1 or v.numel() < 10_000 else v
        for k, v in stageinteractor_state_dict().items()
    }
    converted = convert_official_adamixer_state_dict(theirs)
    pairs = {
        "backbone.conv1.weight": "backbone.body.stem.conv1.weight",
        "backbone.layer1.0.bn3.running_var": "backbone.body.res2.0.conv3.norm.running_var",
        "backbone.layer4.0.downsample.1.num_batches_tracked": "backbone.body.res5.0.shortcut.norm.num_batches_tracked",
        "neck.lateral_convs.2.conv.bias": "backbone.input_proj.2.0.bias",
        "neck.gn_out.weight": "backbone.shared_norm.weight",
        "rpn_head.init_proposal_bboxes": "initial_boxes",
        "roi_head.bbox_head.3.iof_tau": "stages.3.iof_tau",
        "roi_head.bbox_head.3.fc_cls.bias": "stages.3.class_head.3.bias",
        "roi_head.bbox_head.3.reg_fcs.1.weight": "stages.3.box_head.1.weight",
        "roi_head.bbox_head.3.ffn.layers.1.bias": "stages.3.ffn.2.bias",
        "roi_head.bbox_head.3.feat_extractor.gen_double_d.0.bias": "stages.3.sampler.fine_offsets.bias",
        "roi_head.bbox_head.3.dynamic_conv.S_score_list2.bias": "stages.3.mixing.point_gates.bias",
        "roi_head.bbox_head.3.dynamic_conv.M_score_list_mix_bias.bias": "stages.3.mixing.reused_bias_generator.bias",
        "roi_head.bbox_head.3.dynamic_conv.axis_atten_list.1.bias": "stages.3.mixing.fine_adapters.1.bias",
    }
    for their_key, our_key in pairs.items():
        assert torch.equal(converted[our_key], theirs[their_key]), their_key


def test_keys_that_belong_to_neither_model_are_refused_with_their_names():
    theirs = adamixer_state_dict()
    theirs["roi_head.bbox_head.2.something_new.weight"] = torch.empty(3, device=META)
    theirs["backbone.fc.weight"] = torch.empty(1000, 2048, device=META)
    with pytest.raises(ValueError, match="something_new") as error:
        convert_official_adamixer_state_dict(theirs)
    assert "backbone.fc.weight" in str(error.value)
    with pytest.raises(ValueError, match="not an AdaMixer"):
        detect_adamixer_variant({"model": {"class_embed.0.weight": torch.zeros(1)}})
    resnext = {
        k: v for k, v in adamixer_state_dict().items() if not k.startswith("backbone.layer3.5.")
    }
    with pytest.raises(ValueError, match="ResNet-50/101"):
        detect_adamixer_variant(resnext)


def test_a_missing_key_fails_the_fit_check_with_its_name():
    theirs = adamixer_state_dict()
    del theirs["roi_head.bbox_head.4.sampling_n_mixing.norm.bias"]
    converted = convert_official_adamixer_state_dict(theirs)
    with META:
        model = instantiate(LazyConfig.load("configs/adamixer/adamixer_r50_1x.py").model)
    with pytest.raises(ValueError, match=r"stages\.4\.mixing_norm\.bias"):
        check_fits_model(converted, model)


def test_tool_end_to_end(tmp_path):
    source = tmp_path / "stageinteractor_r50.pth"
    torch.save(
        {"state_dict": stageinteractor_state_dict(), "meta": {"CLASSES": ["person"]}}, source
    )
    output = tmp_path / "converted.pth"
    result = subprocess.run(
        [sys.executable, "tools/convert_official_adamixer.py", str(source), str(output)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Detected stageinteractor, ResNet-50, 6 stages, 100 queries" in result.stdout
    assert "configs/stageinteractor/stageinteractor_r50_1x.py" in result.stdout
    saved = torch.load(output, weights_only=True)["model"]
    assert "stages.5.mixing.channel_gates.weight" in saved and not any(
        "subbox_score" in k for k in saved
    )
