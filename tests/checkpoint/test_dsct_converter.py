"""DSCT converter (authors' key names -> ours) and initialisation from a COCO Deformable DETR."""

import argparse
import datetime
import logging
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from deformable_family.checkpoint import (
    check_fits_model,
    convert_official_dsct_state_dict,
    detect_dsct_variant,
    load_official_checkpoint,
)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..")
sys.path.insert(0, HERE)
from test_deformable_detr_converter import manifest_state_dict  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_official_dsct as convert_tool  # noqa: E402

D_MODEL = 256


def official_dsct_checkpoint(num_logits=27, num_subject_queries=4):
    """The authors' DSCT layout (reference: 562 keys): their plain multi-scale R50 Deformable DETR's
    keys (the committed manifest, each tensor a distinct constant) with the detection heads replaced
    by class_embed_dsct / bbox_embed_dsct (one module repeated for the 6 layers) and
    query_embed_dsct; saved as their training checkpoints are."""
    state = manifest_state_dict("multi_scale")["model"]
    for key in [k for k in state if k.startswith(("class_embed.", "bbox_embed."))]:
        del state[key]
    head = {
        "class_embed_dsct.0.weight": torch.randn(num_logits, D_MODEL),
        "class_embed_dsct.0.bias": torch.randn(num_logits),
        "bbox_embed_dsct.0.layers.0.weight": torch.randn(D_MODEL, D_MODEL),
        "bbox_embed_dsct.0.layers.0.bias": torch.randn(D_MODEL),
        "bbox_embed_dsct.0.layers.1.weight": torch.randn(D_MODEL, D_MODEL),
        "bbox_embed_dsct.0.layers.1.bias": torch.randn(D_MODEL),
        "bbox_embed_dsct.0.layers.2.weight": torch.randn(4, D_MODEL),
        "bbox_embed_dsct.0.layers.2.bias": torch.randn(4),
    }
    for layer in range(6):
        for key, value in head.items():
            # the same tensor for every layer, as nn.ModuleList([head] * 6)
            state[key.replace(".0.", f".{layer}.", 1)] = value
    state["query_embed_dsct.weight"] = torch.randn(num_subject_queries, 2 * D_MODEL)
    args = argparse.Namespace(
        dec_n_sp=100 if num_logits == 27 else 0,
        dec_n_sm=50 if num_logits == 27 else 0,
        num_queries=num_subject_queries,
        lr=2e-4,
        lr_backbone_names=["backbone.0"],
    )
    return {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]},
        "lr_scheduler": {"step_size": 40, "gamma": 0.1, "last_epoch": 50, "_step_count": 51},
        "epoch": 49,
        "args": args,
    }


def full_dsct(caer=False, overrides=()):
    name = "dsct_r50_caer_s_50ep.py" if caer else "dsct_r50_emotic_50ep.py"
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "dsct", name))
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    with torch.device("meta"):
        return instantiate(cfg.model)


def tiny_dsct_config():
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "common", "models", "dsct.py"))
    model = cfg.model
    model.backbone.depth = 18
    model.transformer.d_model = 64
    for part in (model.transformer.encoder, model.transformer.decoder):
        part.num_layers = 2
        part.d_ffn = 128
        part.n_heads = 4
        part.n_points = 2
    model.num_context_queries = 10
    model.transformer.decoder.post_cross_attn.num_spatial = 5
    model.transformer.decoder.post_cross_attn.num_semantic = 3
    return cfg


def test_converts_the_authors_keys_and_fits_the_configs():
    checkpoint = official_dsct_checkpoint()
    official = checkpoint["model"]
    assert len(official) == 562
    converted, variant = convert_official_dsct_state_dict(checkpoint)
    assert (variant.dataset, variant.num_emotions, variant.num_subject_queries) == ("emotic", 26, 4)
    assert (variant.num_spatial, variant.num_semantic) == (100, 50)
    check_fits_model(converted, full_dsct())
    assert len(converted) == 522
    pairs = {
        "subject_query_embed.weight": "query_embed_dsct.weight",
        "query_embed.weight": "query_embed.weight",
        "subject_class_embed.bias": "class_embed_dsct.3.bias",
        "subject_bbox_embed.layers.2.weight": "bbox_embed_dsct.0.layers.2.weight",
        "transformer.decoder.layers.1.self_attn_norm.weight": "transformer.decoder.layers.1.norm2.weight",
        "transformer.decoder.layers.4.cross_attn_norm.bias": "transformer.decoder.layers.4.norm1.bias",
        "backbone.body.stem.conv1.weight": "backbone.0.body.conv1.weight",
        "backbone.body.res3.0.shortcut.norm.running_var": "backbone.0.body.layer2.0.downsample.1.running_var",
        "backbone.input_proj.3.0.weight": "input_proj.3.0.weight",
    }
    for ours, theirs in pairs.items():
        torch.testing.assert_close(converted[ours], official[theirs])
    caer = official_dsct_checkpoint(num_logits=8, num_subject_queries=9)
    caer_converted, caer_variant = convert_official_dsct_state_dict(caer)
    assert (caer_variant.dataset, caer_variant.num_emotions) == ("caer_s", 7)
    assert (caer_variant.num_subject_queries, caer_variant.num_spatial) == (9, 0)
    check_fits_model(caer_converted, full_dsct(caer=True))


def test_refuses_checkpoints_that_do_not_fit():
    checkpoint = official_dsct_checkpoint()
    del checkpoint["model"]["query_embed_dsct.weight"]
    with pytest.raises(
        ValueError, match=r"not a DSCT checkpoint: missing \['query_embed_dsct.weight'\]"
    ):
        convert_official_dsct_state_dict(checkpoint)
    checkpoint = official_dsct_checkpoint()
    checkpoint["model"]["transformer.decoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="transformer.decoder.layers.0.extra.weight"):
        convert_official_dsct_state_dict(checkpoint)
    checkpoint = official_dsct_checkpoint()
    checkpoint["model"]["class_embed_dsct.1.bias"] = torch.zeros(27)
    with pytest.raises(
        ValueError, match="class_embed_dsct.1.bias differs from class_embed_dsct.0.bias"
    ):
        convert_official_dsct_state_dict(checkpoint)
    with pytest.raises(ValueError, match="class_embed_dsct has 91 rows"):
        detect_dsct_variant(official_dsct_checkpoint(num_logits=91))
    # Against a model of other sizes every missing/unexpected/mis-shaped key is named.
    converted, _ = convert_official_dsct_state_dict(official_dsct_checkpoint(num_subject_queries=5))
    del converted["subject_class_embed.bias"]
    with pytest.raises(
        ValueError,
        match=r"missing 1 \['subject_class_embed.bias'\].*subject_query_embed.weight: "
        r"checkpoint \(5, 512\) vs model \(4, 512\)",
    ):
        check_fits_model(converted, full_dsct())


def test_reads_training_checkpoints_without_running_code(tmp_path):
    path = str(tmp_path / "checkpoint0049.pth")
    torch.save(official_dsct_checkpoint(), path)
    loaded = load_official_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].dec_n_sp == 100
    unsafe = official_dsct_checkpoint()
    unsafe["args"] = datetime.date(2024, 1, 1)  # any class other than argparse.Namespace is refused
    torch.save(unsafe, str(tmp_path / "unsafe.pth"))
    with pytest.raises(ValueError, match="weights_only=True"):
        load_official_checkpoint(str(tmp_path / "unsafe.pth"))


def test_tool_end_to_end(tmp_path, capsys):
    path, out = str(tmp_path / "checkpoint0049.pth"), str(tmp_path / "converted.pth")
    torch.save(official_dsct_checkpoint(num_subject_queries=6), path)
    assert convert_tool.main([path, out]) == 0
    printed = capsys.readouterr().out
    assert "Detected DSCT on emotic" in printed and "dsct_r50_emotic_50ep.py" in printed
    assert "model.num_subject_queries=6" in printed
    converted = torch.load(out, weights_only=True)["model"]
    assert converted["subject_query_embed.weight"].shape == (6, 512) and len(converted) == 522


def test_coco_initialisation_loads_all_but_the_subject_queries_and_heads(tmp_path, caplog):
    # Full size, on the meta device: DSCT's entries that a converted COCO Deformable DETR (same names,
    # same shapes) provides. The reference: 513 loaded, only the subject queries and heads are fresh.
    detr_cfg = LazyConfig.load(
        os.path.join(REPO, "configs", "deformable_detr", "deformable_detr_r50_50ep.py")
    )
    dsct_cfg = LazyConfig.load(os.path.join(REPO, "configs", "dsct", "dsct_r50_emotic_50ep.py"))
    with torch.device("meta"):
        coco = instantiate(detr_cfg.model).state_dict()
        dsct = instantiate(dsct_cfg.model).state_dict()
    loaded = [k for k in dsct if k in coco and coco[k].shape == dsct[k].shape]
    fresh = sorted(set(dsct) - set(loaded))
    assert len(dsct) == 522 and len(loaded) == 513
    assert fresh == [
        "subject_bbox_embed.layers.0.bias",
        "subject_bbox_embed.layers.0.weight",
        "subject_bbox_embed.layers.1.bias",
        "subject_bbox_embed.layers.1.weight",
        "subject_bbox_embed.layers.2.bias",
        "subject_bbox_embed.layers.2.weight",
        "subject_class_embed.bias",
        "subject_class_embed.weight",
        "subject_query_embed.weight",
    ]
    assert sorted(set(coco) - set(dsct)) == sorted(
        k for k in coco if k.startswith(("class_embed.", "bbox_embed."))
    )
    # Tiny, real tensors, through detectron2's checkpointer as train.init_checkpoint is loaded.
    detr_cfg.model.backbone.depth = 18
    detr_cfg.model.transformer.d_model = 64
    for part in (detr_cfg.model.transformer.encoder, detr_cfg.model.transformer.decoder):
        part.num_layers, part.d_ffn, part.n_heads, part.n_points = 2, 128, 4, 2
    detr_cfg.model.num_queries = 10
    detr = instantiate(detr_cfg.model)
    path = str(tmp_path / "coco.pth")
    torch.save({"model": detr.state_dict()}, path)
    model = instantiate(tiny_dsct_config().model)
    before = model.subject_bbox_embed.layers[0].weight.clone()
    with caplog.at_level(logging.INFO, logger="deformable_family.modeling.dsct.dsct"):
        DetectionCheckpointer(model).load(path)
    torch.testing.assert_close(model.query_embed.weight, detr.query_embed.weight)
    torch.testing.assert_close(
        model.transformer.decoder.layers[1].linear2.weight,
        detr.transformer.decoder.layers[1].linear2.weight,
    )
    torch.testing.assert_close(
        model.backbone.input_proj[3][0].weight, detr.backbone.input_proj[3][0].weight
    )
    torch.testing.assert_close(model.subject_bbox_embed.layers[0].weight, before)
    assert (
        "starting fresh: subject_bbox_embed, subject_class_embed, subject_query_embed"
        in caplog.text
    )
    assert "ignored" in caplog.text and "(class_embed, bbox_embed)" in caplog.text
