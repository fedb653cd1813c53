#!/usr/bin/env python
"""Convert a checkpoint of the SMCA-DETR authors (github.com/gaopengcuhk/SMCA-DETR) to this package.

    python tools/convert_official_smca.py IN.pth OUT.pth [--num-classes 80|91]

Detects the variant from the keys (single scale, or the released multi-scale model of
``Multi_scale_SMCA.zip``; ResNet depth, layer counts, FFN widths, scale type, encoder kernel), drops
the class head's extra "no-object" row and maps the 91 COCO category rows to detectron2's 80
contiguous classes (``--num-classes 91`` keeps them), renames everything to :class:`SMCADETR`'s
names, checks that the result loads into the matching config in configs/smca_detr/ with no missing
or unexpected keys, prints that config with the overrides it needs, and writes
{"model": state_dict} for detectron2's DetectionCheckpointer.
"""

import argparse
import os
import sys

import torch
from detectron2.config import LazyConfig, instantiate

from deformable_family.checkpoint import (
    check_fits_model,
    convert_official_smca_state_dict,
    detect_smca_variant,
    smca_config_name_for,
    smca_structure_overrides,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "smca_detr")


def load_official(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input checkpoint {path} does not exist")
    # The authors' files also hold their argparse.Namespace of options: allow only that class.
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True)


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
        "--config-file", default=None, help="config to check against (default: the matching one)"
    )
    args = parser.parse_args(argv)

    checkpoint = load_official(args.input)
    try:
        variant = detect_smca_variant(checkpoint)
        converted = convert_official_smca_state_dict(checkpoint, args.num_classes)
    except ValueError as error:
        raise SystemExit(f"{args.input}: {error}") from error

    config_file = args.config_file or os.path.normpath(
        os.path.join(CONFIG_DIR, smca_config_name_for(variant))
    )
    overrides = smca_structure_overrides(variant, args.num_classes)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    try:
        check_fits_model(converted, model)
    except ValueError as error:
        raise SystemExit(f"{args.input} does not fit {config_file}: {error}") from error

    torch.save({"model": converted}, args.output)
    print(
        f"Detected SMCA-DETR {variant.name}, ResNet-{variant.depth}, "
        f"{variant.num_encoder_layers}+{variant.num_decoder_layers} layers, scale type "
        f"{variant.scale_type}, {variant.num_classes} classes (+1 no-object row, dropped)."
    )
    print(f"Matches {config_file} with overrides: {' '.join(overrides)}")
    print(f"Wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
