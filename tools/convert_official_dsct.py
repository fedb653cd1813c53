#!/usr/bin/env python
"""Convert a DSCT checkpoint of the authors (Sampson-Lee/DSCT) to this package's names.

    python tools/convert_official_dsct.py checkpoint0049.pth OUT.pth

Reads their training checkpoint ({"model", "optimizer", "lr_scheduler", "epoch", "args"}, args an
argparse.Namespace) with torch.load(weights_only=True), allowing argparse.Namespace only, so loading
runs no code from the file. Detects EMOTIC (27 class logits) or CAER-S (8) and the number of subject
queries, checks that the result loads into configs/dsct/dsct_r50_<dataset>_50ep.py with no missing or
unexpected keys, prints the config with the overrides the checkpoint needs (subject queries, SSRA
neighbours from its args), and writes {"model": state_dict} for detectron2's DetectionCheckpointer.
"""

import argparse
import os
import sys
from typing import List

import torch
from detectron2.config import LazyConfig, instantiate

from deformable_family.checkpoint import check_fits_model
from deformable_family.checkpoint.dsct import (
    DSCTVariant,
    convert_official_dsct_state_dict,
    dsct_config_name_for,
    load_official_checkpoint,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "dsct")


def structure_overrides(variant: DSCTVariant, cfg) -> List[str]:
    """Overrides that give the dataset's config the checkpoint's structure and SSRA settings."""
    overrides = []
    if variant.num_subject_queries != cfg.model.num_subject_queries:
        overrides.append(f"model.num_subject_queries={variant.num_subject_queries}")
    if variant.num_context_queries != cfg.model.num_context_queries:
        overrides.append(f"model.num_context_queries={variant.num_context_queries}")
    ssra = cfg.model.transformer.decoder.post_cross_attn
    for field, value in (
        ("num_spatial", variant.num_spatial),
        ("num_semantic", variant.num_semantic),
    ):
        if value is not None and value != ssra[field]:
            overrides.append(f"model.transformer.decoder.post_cross_attn.{field}={value}")
    return overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="the authors' DSCT checkpoint (.pth)")
    parser.add_argument("output", help="where to write {'model': state_dict}")
    parser.add_argument(
        "--config-file", default=None, help="config to check against (default: the dataset's)"
    )
    args = parser.parse_args(argv)

    checkpoint = load_official_checkpoint(args.input)
    converted, variant = convert_official_dsct_state_dict(checkpoint)
    config_file = args.config_file or os.path.normpath(
        os.path.join(CONFIG_DIR, dsct_config_name_for(variant))
    )
    cfg = LazyConfig.load(config_file)
    overrides = structure_overrides(variant, cfg)
    cfg = LazyConfig.apply_overrides(cfg, overrides)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    check_fits_model(converted, model)

    torch.save({"model": converted}, args.output)
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    print(
        f"Detected DSCT on {variant.dataset}: {variant.num_emotions} emotions, "
        f"{variant.num_subject_queries} subject + {variant.num_context_queries} context queries, "
        f"SSRA K_sp={variant.num_spatial} K_se={variant.num_semantic} (from args), epoch {epoch}."
    )
    print(f"Matches {config_file} with overrides: {' '.join(overrides) or '(none)'}")
    print(f"Wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
