"""deformable_family.model_zoo: configs by name, the built model, the shared --config-file resolver."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from omegaconf import DictConfig

from deformable_family import model_zoo

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
QUICKSTART = "quickstart/deformable_detr_shapes.py"


def _configs_in_checkout():
    """Every complete config of the repository's configs/ (the shared pieces of common/ excluded)."""
    names = []
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        relative = os.path.relpath(folder, os.path.join(ROOT, "configs"))
        if relative != "." and relative.split(os.sep)[0] != "common":
            names += [f"{relative}/{f}".replace(os.sep, "/") for f in files if f.endswith(".py")]
    return sorted(names)


def test_list_configs_is_every_config_of_the_checkout():
    names = model_zoo.list_configs()
    assert names == _configs_in_checkout()
    assert "deformable_detr/deformable_detr_r50_50ep.py" in names and QUICKSTART in names
    assert not any(name.startswith("common/") for name in names)


def test_get_config_file_and_get_config():
    path = model_zoo.get_config_file("deformable_detr/deformable_detr_r50_50ep.py")
    assert os.path.isfile(path)
    # The .py may be left out, as in detectron2's names without extension.
    assert model_zoo.get_config_file("deformable_detr/deformable_detr_r50_50ep") == path
    cfg = model_zoo.get_config("deformable_detr/deformable_detr_r50_two_stage_50ep.py")
    assert isinstance(cfg, DictConfig)
    for key in ("model", "dataloader", "optimizer", "lr_multiplier", "train"):
        assert key in cfg
    # The relative imports of the config chain (two-stage <- box refine <- multi-scale <- common/) ran.
    assert cfg.model.two_stage is True and cfg.model.with_box_refine is True


@pytest.mark.parametrize(
    "wrong, expected",
    [
        (
            "deformable_detr/deformable_detr_r50_50e.py",
            "deformable_detr/deformable_detr_r50_50ep.py",
        ),
        (
            "deformable_detr_r50_two_stage_50ep.py",
            "deformable_detr/deformable_detr_r50_two_stage_50ep.py",
        ),
        (
            "deformable_detr/deformable_detr_r50_twostage_50ep.py",
            "deformable_detr/deformable_detr_r50_two_stage_50ep.py",
        ),
    ],
)
def test_wrong_name_lists_close_names(wrong, expected):
    with pytest.raises(FileNotFoundError) as info:
        model_zoo.get_config_file(wrong)
    message = str(info.value)
    assert repr(wrong) in message and "Close names:" in message and expected in message
    assert "python -m deformable_family.model_zoo" in message


def test_shared_pieces_and_paths_outside_are_not_names():
    for name in ("common/train.py", "../setup.py", os.path.join(ROOT, "configs", QUICKSTART)):
        with pytest.raises(FileNotFoundError):
            model_zoo.get_config_file(name)


def test_trained_true_says_there_are_no_published_weights():
    for call in (model_zoo.get_config, model_zoo.get):
        with pytest.raises(RuntimeError, match="publishes no trained weights.*checkpoint="):
            call(QUICKSTART, trained=True)


def test_get_builds_the_model_and_loads_a_user_checkpoint(tmp_path):
    model = model_zoo.get(QUICKSTART, device="cpu")
    assert type(model).__name__ == "DeformableDETR" and model.two_stage and model.num_classes == 5
    assert next(model.parameters()).device.type == "cpu"
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": torch.rand(3, 64, 80) * 255, "height": 64, "width": 80}])
    assert len(outputs[0]["instances"]) > 0

    checkpoint = str(tmp_path / "model.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    loaded = model_zoo.get(QUICKSTART, device="cpu", checkpoint=checkpoint)
    for (name, expected), (_, actual) in zip(
        model.state_dict().items(), loaded.state_dict().items()
    ):
        assert torch.equal(expected, actual), name
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        model_zoo.get(QUICKSTART, device="cpu", checkpoint=str(tmp_path / "missing.pth"))


def test_resolve_config_file_takes_a_path_or_a_name(tmp_path, monkeypatch):
    path = os.path.join(ROOT, "configs", QUICKSTART)
    by_name = model_zoo.resolve_config_file(QUICKSTART)
    assert os.path.samefile(by_name, path)
    assert model_zoo.resolve_config_file(path) == path
    # The repository-relative spelling works from any folder, as in the README's commands.
    monkeypatch.chdir(tmp_path)
    assert os.path.samefile(model_zoo.resolve_config_file(f"configs/{QUICKSTART}"), path)
    own = tmp_path / "my_config.py"
    own.write_text("")
    assert model_zoo.resolve_config_file("my_config.py") == "my_config.py"
    with pytest.raises(
        FileNotFoundError, match="no such file.*Close names: quickstart/deformable_detr_shapes.py"
    ):
        model_zoo.resolve_config_file("quickstart/deformable_detr_shape.py")


def test_train_net_and_tools_take_a_model_zoo_name(capsys):
    import sys

    from detectron2.engine import default_argument_parser

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import model_stats
    import train_net

    args = default_argument_parser().parse_args(
        ["--config-file", QUICKSTART, "model.num_queries=7"]
    )
    cfg = train_net.setup(args)
    assert os.path.samefile(args.config_file, os.path.join(ROOT, "configs", QUICKSTART))
    assert cfg.model.num_queries == 7
    bad = default_argument_parser().parse_args(
        ["--config-file", "quickstart/deformable_detr_shape"]
    )
    with pytest.raises(
        FileNotFoundError, match="Close names: quickstart/deformable_detr_shapes.py"
    ):
        train_net.setup(bad)

    assert model_stats.main(["--config-file", QUICKSTART, "--no-flops"]) == 0
    assert "parameters:" in capsys.readouterr().out
