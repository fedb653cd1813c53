"""tools/model_stats.py: the FLOP handle of the deformable sampling op."""

import os
import sys

import torch
from detectron2.config import instantiate

sys.path.insert(0, os.path.dirname(__file__))
from test_deformable_detr import tiny_model_config  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import model_stats  # noqa: E402


def test_ms_deform_attn_flops_are_five_per_sample_and_channel():
    torch.manual_seed(0)
    model = instantiate(tiny_model_config("multi_scale")).eval()
    height, width = 128, 192
    with torch.no_grad():
        analysis = model_stats.count_flops(model, height, width)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counted = analysis.by_operator()["ms_deform_attn"]
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, height, width))
    num_pixels = sum(f.shape[-2] * f.shape[-1] for f in features.values())
    transformer = model.transformer
    encoder_attn = transformer.encoder.layers[0].self_attn
    per_query = 5 * encoder_attn.n_levels * encoder_attn.n_points * encoder_attn.d_model
    expected = per_query * (
        num_pixels * len(transformer.encoder.layers)
        + model.num_queries * len(transformer.decoder.layers)
    )
    assert counted == expected
