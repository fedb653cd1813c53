#!/usr/bin/env python
"""Draw a detector's detections on images with detectron2's Visualizer.

    python tools/demo.py --config-file quickstart/deformable_detr_shapes.py \
        --input img.png --output out.png train.init_checkpoint=output/quickstart_shapes/model_final.pth

The image is prepared by the config's test mapper (``dataloader.test.mapper``: same resizing and
channel order as evaluation) and the class names come from the test dataset's metadata.
"""
import argparse
import logging
import os
import sys
from typing import List

import torch

import deformable_family.model_zoo  # noqa: I001  (before detectron2: see train_net.py)
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import deformable_family.data  # noqa: F401  (registers the built-in datasets)
from deformable_family.data import read_image_or_fail
from deformable_family.engine import AtomicDetectionCheckpointer, load_ema_weights

logger = logging.getLogger("deformable_family.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a LazyConfig file or model-zoo name")
    parser.add_argument("--input", required=True, nargs="+", help="image files")
    parser.add_argument("--output", required=True, help="an image file (one input) or a folder")
    parser.add_argument("--confidence-threshold", type=float, default=0.3, help="minimum score drawn")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="key=value config overrides")
    return parser


def _output_paths(inputs: List[str], output: str) -> List[str]:
    if len(inputs) == 1 and os.path.splitext(output)[1]:
        return [output]
    os.makedirs(output, exist_ok=True)
    return [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + ".png") for p in inputs]


def main(argv: List[str] = None) -> List[str]:
    args = get_parser().parse_args(argv)
    setup_logger(name="deformable_family")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ValueError(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    config_file = deformable_family.model_zoo.resolve_config_file(args.config_file)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), args.opts)

    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model.eval()
    if cfg.train.init_checkpoint:
        checkpoint = AtomicDetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        load_ema_weights(model, checkpoint, enabled=cfg.train.get("ema", {}).get("enabled", False))
    else:
        logger.warning("train.init_checkpoint is empty: drawing the detections of a randomly initialised model")
    mapper = instantiate(cfg.dataloader.test.mapper)
    dataset_name = cfg.dataloader.test.dataset.names
    metadata = MetadataCatalog.get(dataset_name if isinstance(dataset_name, str) else dataset_name[0])

    outputs = _output_paths(args.input, args.output)
    for input_path, output_path in zip(args.input, outputs):
        image_rgb = read_image_or_fail(input_path, "RGB")
        height, width = image_rgb.shape[:2]
        inputs = mapper({"file_name": input_path, "height": height, "width": width})
        with torch.no_grad():
            instances = model([inputs])[0]["instances"].to("cpu")
        instances = instances[instances.scores >= args.confidence_threshold]
        logger.info(f"{input_path}: {len(instances)} detections with score >= {args.confidence_threshold}")
        drawing = Visualizer(image_rgb, metadata).draw_instance_predictions(instances)
        drawing.save(output_path)
        logger.info(f"Saved {output_path}")
    return outputs


if __name__ == "__main__":
    main(sys.argv[1:])
