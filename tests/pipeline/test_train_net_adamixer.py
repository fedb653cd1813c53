"""train_net.py end to end with the real AdaMixer / StageInteractor (tiny variants of the quickstart
configs) on a tiny shapes split: train -> checkpoint -> evaluate with COCOEvaluator."""
import os
import sys

import pytest
from detectron2.engine import default_argument_parser

from deformable_family.data import register_shapes

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

PREFIX = "shapes_adamixer_pipetest"
TINY = [
    f"dataloader.train.dataset.names={PREFIX}_train",
    f"dataloader.test.dataset.names={PREFIX}_val",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "model.stages.d_model=32",
    "model.stages.num_heads=2",
    "model.stages.ffn_dim=64",
    "model.stages.num_stages=3",
    "model.num_queries=10",
    "train.log_period=1",
    "train.seed=0",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "shapes_v1")
    register_shapes(PREFIX, root=root, num_images={"train": 4, "val": 2}, seed=0)
    return root


@pytest.mark.parametrize("name", ["adamixer", "stageinteractor"])
def test_train_then_evaluate(name, dataset, tmp_path):
    config = os.path.join(ROOT, "configs", "quickstart", f"{name}_shapes.py")
    out = str(tmp_path / "run")
    opts = [
        *TINY,
        f"train.output_dir={out}",
        "train.max_iter=3",
        "train.eval_period=3",
        "train.checkpointer.period=2",
    ]
    train_net.main(default_argument_parser().parse_args(["--config-file", config, *opts]))
    files = os.listdir(out)
    assert "model_final.pth" in files and "metrics.json" in files
    with open(os.path.join(out, "metrics.json")) as f:
        text = f.read()
    # Every stage is supervised: the last stage's losses and those of stages 0 and 1.
    for key in ("total_loss", "loss_class", "loss_bbox_0", "loss_giou_1", "bbox/AP50"):
        assert f'"{key}"' in text, key
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            config,
            "--eval-only",
            *opts,
            f"train.init_checkpoint={out}/model_final.pth",
        ]
    )
    results = train_net.main(args)
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "AP-circle"}
