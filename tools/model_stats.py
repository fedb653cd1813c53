#!/usr/bin/env python
"""Parameter counts and GFLOPs of a model config.

    python tools/model_stats.py --config-file configs/deformable_detr/deformable_detr_r50_50ep.py \
        [--height 800 --width 1067] [--no-flops] [key=value overrides ...]
    python tools/model_stats.py --config-file deformable_detr/deformable_detr_r50_50ep.py --record

``--config-file`` is a path or a model-zoo name. ``--record`` writes the counts (and GFLOPs, unless
``--no-flops``) of the config as shipped into ``model_stats.json`` next to it, which the model-zoo
table (``python -m deformable_family.model_zoo``) reads; run it from a source checkout.

FLOPs are counted by fvcore's FlopCountAnalysis (one multiply-add = one flop, its convention) on one
image of the given size in inference mode. Ops fvcore does not know get handles here:
- the deformable sampling op (``deformable_family::ms_deform_attn``): 5 multiply-adds per sampled
  point and channel, i.e. 5 * N * Lq * L * P * C: 4 for the bilinear interpolation of the corners and
  1 for the attention-weighted sum (the 5 N_q K C term of the paper's appendix A.1, K = L * P);
- ``aten::scaled_dot_product_attention`` (nn.MultiheadAttention's core): 2 * B * M * Lq * Lk * D_head
  (Q K^T and the weighted sum of V).
Element-wise ops (softmax, activations, additions) are not counted, as in fvcore.
"""

import argparse
import logging
import sys
from collections import Counter
from typing import Any, List

import torch

import deformable_family.model_zoo  # noqa: I001  (before detectron2: see train_net.py)
from detectron2.config import LazyConfig, instantiate
from fvcore.nn import FlopCountAnalysis

from deformable_family.model_zoo import catalog, resolve_config_file
from deformable_family.model_zoo.model_zoo import is_installed_copy


def _shape(value) -> List[int]:
    return value.type().sizes()


def ms_deform_attn_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """inputs: value (N, S, M, D), spatial_shapes, level_start_index, sampling_locations
    (N, Lq, M, L, P, 2), attention_weights."""
    _, _, num_heads, head_dim = _shape(inputs[0])
    batch, num_queries, _, num_levels, num_points, _ = _shape(inputs[3])
    return 5 * batch * num_queries * num_levels * num_points * num_heads * head_dim


def sdpa_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """inputs: query (..., Lq, E), key (..., Lk, E), value (..., Lk, Ev)."""
    query, key, value = (_shape(x) for x in inputs[:3])
    leading = 1
    for size in query[:-2]:
        leading *= size
    return leading * query[-2] * key[-2] * (query[-1] + value[-1])


class _ImageForward(torch.nn.Module):
    """Traceable wrapper: a normalised image batch and its padding mask in, the predictions out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        outputs = self.model.forward_outputs(images, mask)
        return outputs["pred_logits"], outputs["pred_boxes"]


def count_flops(model: torch.nn.Module, height: int, width: int) -> FlopCountAnalysis:
    images = torch.randn(1, 3, height, width)
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    analysis = FlopCountAnalysis(_ImageForward(model).eval(), (images, mask))
    analysis.set_op_handle(
        "deformable_family::ms_deform_attn",
        ms_deform_attn_flop,
        "aten::scaled_dot_product_attention",
        sdpa_flop,
    )
    return analysis


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig file or model-zoo name")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1067)
    parser.add_argument("--no-flops", action="store_true", help="only count parameters")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the statistics into model_stats.json next to the config",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    args = parser.parse_args(argv)
    config_file = resolve_config_file(args.config_file)
    if args.record and args.opts:
        overrides = " ".join(args.opts)
        raise SystemExit(f"--record records the config as shipped: drop the overrides {overrides}")
    if args.record and is_installed_copy(config_file):
        raise SystemExit(
            f"--record: {config_file} is the installed copy of the config; record in a checkout "
            "(pass its configs/<family>/<file>.py, or use an editable install)"
        )

    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), args.opts)
    model = instantiate(cfg.model)
    model.eval()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"config: {config_file} {' '.join(args.opts)}")
    print(f"parameters: {total:,} total, {trainable:,} trainable")
    if args.no_flops:
        if args.record:
            print(f"recorded in {catalog.record_stats(config_file, total, trainable)}")
        return 0

    from deformable_family.layers.ms_deform_attn_op import compiled_kernels

    if "cpu" not in compiled_kernels():
        print(
            "warning: the compiled op is missing; the reference path is traced instead and its sampling is "
            "counted by fvcore's grid_sampler handle only (the weighted sum is not counted)"
        )
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        analysis = count_flops(model, args.height, args.width)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total_flops = analysis.total()
    print(f"GFLOPs at {args.height}x{args.width}: {total_flops / 1e9:.1f}")
    by_module = analysis.by_module()
    for name in ("model.backbone", "model.transformer.encoder", "model.transformer.decoder"):
        print(f"  {name[len('model.'):]}: {by_module.get(name, 0) / 1e9:.1f}")
    by_operator = Counter(analysis.by_operator())
    print(
        "  by operator: "
        + ", ".join(f"{op} {flops / 1e9:.1f}" for op, flops in by_operator.most_common())
    )
    skipped = analysis.unsupported_ops()
    if skipped:
        print("  not counted: " + ", ".join(f"{op} x{n}" for op, n in sorted(skipped.items())))
    if args.record:
        size = (args.height, args.width)
        path = catalog.record_stats(config_file, total, trainable, total_flops / 1e9, size)
        print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
