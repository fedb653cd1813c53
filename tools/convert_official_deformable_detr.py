#!/usr/bin/env python
"""Convert a checkpoint released by the Deformable DETR authors to this package's names.

    python tools/convert_official_deformable_detr.py r50_deformable_detr-checkpoint.pth OUT.pth

Detects the variant (single/multi-scale, box refinement, two-stage, ResNet depth), maps the 91 COCO
category rows of the class heads to detectron2's 80 contiguous classes, checks that the result loads
into the matching model-zoo config (deformable_detr/...) with no missing or unexpected keys, prints
that config, and writes {"model": state_dict} for detectron2's DetectionCheckpointer.
"""

import argparse
import os
import sys
from typing import List

import torch

import deformable_family.model_zoo  # noqa: I001  (before detectron2: see train_net.py)
from detectron2.config import LazyConfig, instantiate

from deformable_family.checkpoint import (
    check_fits_model,
    config_name_for,
    convert_official_state_dict,
    detect_variant,
)

def load_official(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input checkpoint {path} does not exist")
    # The authors' files also hold their argparse.Namespace of options: allow only that class.
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)


def structure_overrides(variant, num_classes: int, proposal_num_classes: int) -> List[str]:
    """Overrides that give the matching config the checkpoint's sizes (none for released models
    beyond the class count)."""
    overrides = [f"model.num_classes={num_classes}"]
    if variant.two_stage and proposal_num_classes != num_classes:
        overrides.append(f"model.proposal_num_classes={proposal_num_classes}")
    if variant.num_encoder_layers != 6:
        overrides.append(f"model.transformer.encoder.num_layers={variant.num_encoder_layers}")
    if variant.num_decoder_layers != 6:
        overrides.append(f"model.transformer.decoder.num_layers={variant.num_decoder_layers}")
    return overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="the authors' checkpoint (.pth, a dict with 'model')")
    parser.add_argument("output", help="where to write {'model': state_dict}")
    parser.add_argument(
        "--num-classes", type=int, default=80, help="80 (detectron2's COCO ids) or 91 (keep rows)"
    )
    parser.add_argument(
        "--proposal-num-classes",
        type=int,
        default=None,
        help="two-stage proposal head width (default: --num-classes, as the configs)",
    )
    parser.add_argument(
        "--config-file",
        default=None,
        help="config file or model-zoo name to check against (default: the matching one)",
    )
    args = parser.parse_args(argv)

    checkpoint = load_official(args.input)
    variant = detect_variant(checkpoint)
    proposal_num_classes = args.proposal_num_classes or args.num_classes
    converted = convert_official_state_dict(checkpoint, args.num_classes, proposal_num_classes)

    config_file = deformable_family.model_zoo.resolve_config_file(
        args.config_file or f"deformable_detr/{config_name_for(variant)}"
    )
    overrides = structure_overrides(variant, args.num_classes, proposal_num_classes)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    check_fits_model(converted, model)

    torch.save({"model": converted}, args.output)
    print(
        f"Detected {variant.name}, ResNet-{variant.depth}, {variant.num_levels} levels, "
        f"{variant.num_encoder_layers}+{variant.num_decoder_layers} layers, {variant.num_classes} class rows."
    )
    print(f"Matches {config_file} with overrides: {' '.join(overrides)}")
    print(f"Wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
