"""train_net.py end to end with the real SMCADETR (a tiny variant of the SMCA quickstart config)
on a tiny shapes split: train -> checkpoint -> evaluate, then --eval-only from the checkpoint gives
the same detections."""

import json
import os
import sys

import pytest
import torch
from detectron2.engine import default_argument_parser

from deformable_family.data import register_shapes

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "quickstart", "smca_detr_shapes.py")
PREFIX = "shapes_smca_pipetest"
TINY = [
    f"dataloader.train.dataset.names={PREFIX}_train",
    f"dataloader.test.dataset.names={PREFIX}_val",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "model.transformer.d_model=32",
    "model.transformer.encoder.d_ffn=64",
    "model.transformer.decoder.d_ffn=64",
    "model.transformer.decoder.num_layers=2",
    "model.num_queries=10",
    "train.log_period=1",
    "train.seed=0",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "shapes_v1")
    register_shapes(PREFIX, root=root, num_images={"train": 4, "val": 2}, seed=0)
    return root


def _args(output_dir, *extra, opts=()):
    argv = ["--config-file", CONFIG, *extra, *TINY, f"train.output_dir={output_dir}", *opts]
    return default_argument_parser().parse_args(argv)


def _detections(output_dir):
    """The evaluator's detections of the last evaluation: sorted (image_id, category_id, score)."""
    with open(os.path.join(output_dir, "inference", "coco_instances_results.json")) as f:
        return sorted((d["image_id"], d["category_id"], d["score"]) for d in json.load(f))


def _assert_same(detections, expected):
    assert len(detections) == len(expected) > 0
    for got, want in zip(detections, expected):
        assert got[:2] == want[:2] and got[2] == pytest.approx(want[2], abs=1e-5)


def test_smca_trains_checkpoints_and_evaluates(dataset, tmp_path):
    out = str(tmp_path / "run")
    # A large constant lr so that 3 iterations move the weights away from the (seeded) init.
    schedule = [
        "train.max_iter=3",
        "train.eval_period=3",
        "train.checkpointer.period=2",
        "optimizer.lr=1e-2",
        "lr_multiplier.warmup_length=0.0",
    ]
    train_net.main(_args(out, opts=schedule))
    files = os.listdir(out)
    for name in ("model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json"):
        assert name in files, (name, files)
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    losses = [r for r in records if "total_loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in losses)
    # Deep supervision over the 2 decoder layers: the last one and one auxiliary.
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_0"} <= set(losses[-1])
    assert "loss_class_1" not in losses[-1]
    assert any("bbox/AP50" in r for r in records)
    after_training = _detections(out)

    checkpoint = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")
    assert "transformer.decoder.centre_head.layers.0.weight" in checkpoint["model"]

    results = train_net.main(
        _args(out, "--eval-only", opts=[f"train.init_checkpoint={out}/model_final.pth"])
    )
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "AP-circle", "AP-ring"}
    # The weights evaluated after loading the checkpoint are the ones evaluated after training ...
    _assert_same(_detections(out), after_training)
    # ... and not what the seeded initialisation alone gives (the control: without the checkpoint).
    untrained = str(tmp_path / "untrained")
    train_net.main(_args(untrained, "--eval-only"))
    with pytest.raises(AssertionError):
        _assert_same(_detections(untrained), after_training)
