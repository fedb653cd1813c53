"""An interrupted checkpoint save never replaces the last good checkpoint."""
import os

import pytest
import torch
from torch import nn

from deformable_family.engine import AtomicDetectionCheckpointer
from deformable_family.engine import checkpointer as checkpointer_module


def _model(value):
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_save_then_load(tmp_path):
    AtomicDetectionCheckpointer(_model(1.0), str(tmp_path)).save("model_final", iteration=7)
    target = _model(0.0)
    checkpointer = AtomicDetectionCheckpointer(target, str(tmp_path))
    assert checkpointer.has_checkpoint()
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 7
    assert torch.all(target.weight == 1.0)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpointer = AtomicDetectionCheckpointer(_model(1.0), str(tmp_path))
    checkpointer.save("model_0000001")
    checkpointer.save("model_final")
    good = (tmp_path / "model_final.pth").read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("simulated crash in the middle of torch.save")

    monkeypatch.setattr(checkpointer_module.torch, "save", crashing_save)
    checkpointer.model = _model(2.0)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")
    monkeypatch.undo()

    assert (tmp_path / "model_final.pth").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_final.pth"]
    target = _model(0.0)
    AtomicDetectionCheckpointer(target, str(tmp_path)).resume_or_load("", resume=True)
    assert torch.all(target.weight == 1.0)


def test_crash_before_the_tag_keeps_the_tag(tmp_path, monkeypatch):
    checkpointer = AtomicDetectionCheckpointer(_model(1.0), str(tmp_path))
    checkpointer.save("model_0000001")
    real_replace = os.replace

    def failing_replace(src, dst):
        if dst.endswith("last_checkpoint"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointer_module.os, "replace", failing_replace)
    with pytest.raises(OSError):
        checkpointer.save("model_0000002")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
