#!/usr/bin/env python
"""Convert an AdaMixer or StageInteractor checkpoint released by the authors (mmdetection) to this
package's names.

    python tools/convert_official_adamixer.py adamixer_r50_1x_coco.pth OUT.pth

Detects the model (AdaMixer or StageInteractor, ResNet depth, stages, queries), renames
mmdetection's ResNet, neck, query generator and stages, drops StageInteractor's dead keys
(``subbox_score_list``, ``iou_snyc_statistics``), checks that the result loads into the matching
config in configs/adamixer/ or configs/stageinteractor/ with no missing or unexpected keys, prints
that config, and writes {"model": state_dict} for detectron2's DetectionCheckpointer.
"""
import argparse
import os
import sys

import torch
from detectron2.config import LazyConfig, instantiate

from deformable_family.checkpoint import check_fits_model
from deformable_family.checkpoint.adamixer import (
    adamixer_config_for,
    convert_official_adamixer_state_dict,
    detect_adamixer_variant,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def load_official(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # mmcv's "meta" may hold objects weights_only refuses
        raise ValueError(
            f"cannot load {path} with torch.load(weights_only=True): {error}. If you trust the file, "
            "re-save its 'state_dict' alone: torch.save({'state_dict': torch.load(path, "
            "weights_only=False)['state_dict']}, 'clean.pth')"
        ) from error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="the authors' checkpoint (.pth, a dict with 'state_dict')")
    parser.add_argument("output", help="where to write {'model': state_dict}")
    parser.add_argument(
        "--config-file", default=None, help="config to check against (default: the matching one)"
    )
    args = parser.parse_args(argv)

    checkpoint = load_official(args.input)
    variant = detect_adamixer_variant(checkpoint)
    converted = convert_official_adamixer_state_dict(checkpoint)

    config_name, overrides = adamixer_config_for(variant)
    config_file = args.config_file or os.path.normpath(os.path.join(CONFIG_DIR, config_name))
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    check_fits_model(converted, model)

    torch.save({"model": converted}, args.output)
    print(
        f"Detected {variant.family}, ResNet-{variant.depth}, {variant.num_stages} stages, "
        f"{variant.num_queries} queries, {variant.num_classes} classes."
    )
    print(
        f"Matches {config_file}" + (f" with overrides: {' '.join(overrides)}" if overrides else "")
    )
    print(f"Wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
