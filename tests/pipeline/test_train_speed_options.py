"""train_net.py's speed options: train.compile (torch.compile of named submodules, in place) and
train.amp on the CPU (bfloat16 autocast trainer)."""

import os
import sys

import pytest
from omegaconf import OmegaConf
from torch import nn

from deformable_family.engine import DetrCPUAutocastTrainer

sys.path.insert(0, os.path.dirname(__file__))
from test_train_net import _args, _recording_build_trainer, train_net  # noqa: E402

from deformable_family.data import register_shapes  # noqa: E402

PREFIX = "shapes_speedtest"  # test_train_net's fixture registers its own prefix


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "shapes_v1")
    register_shapes(PREFIX, root=root, num_images={"train": 4, "val": 2}, seed=0)
    return root


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Linear(2, 2)
        self.backbone = nn.Linear(2, 2)


def _cfg(**compile_options):
    return OmegaConf.create({"train": {"compile": compile_options}})


def test_compile_modules_compiles_named_submodules_in_place(monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = _Model()
    keys = list(model.state_dict())
    train_net.compile_modules(model, _cfg(enabled=False, modules=["transformer"]))
    assert compiled == []
    train_net.compile_modules(model, _cfg(enabled=True, modules=["transformer"]))
    assert compiled == [model.transformer] and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="train.compile.modules.*'neck'"):
        train_net.compile_modules(model, _cfg(enabled=True, modules=["neck"]))


def test_cpu_amp_config_reaches_the_trainer(dataset, tmp_path, monkeypatch):
    trainers = []
    monkeypatch.setattr(train_net, "build_trainer", _recording_build_trainer(trainers))
    monkeypatch.setattr(train_net, "inference_on_dataset", lambda *args: {})
    opts = [
        f"dataloader.train.dataset.names={PREFIX}_train",
        f"dataloader.test.dataset.names={PREFIX}_val",
        "train.max_iter=2",
        "train.device=cpu",
        "train.amp.enabled=True",
    ]
    train_net.main(_args(str(tmp_path / "bf16"), opts=opts))
    assert isinstance(trainers[-1], DetrCPUAutocastTrainer)
    assert trainers[-1].iter == 2
