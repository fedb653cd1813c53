"""An interrupted checkpoint save never replaces the last good checkpoint."""
import logging
import os
import pickle

import numpy as np
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


def _load_and_capture_warnings(path):
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    module_logger = logging.getLogger(checkpointer_module.__name__)
    module_logger.addHandler(handler)
    try:
        AtomicDetectionCheckpointer(_model(0.0)).load(str(path))
    finally:
        module_logger.removeHandler(handler)
    return [record.getMessage() for record in records]


def test_caffe2_weights_are_named_on_load(tmp_path):
    """detectron2's ImageNet R-50.pkl is Caffe2's (BGR, std 1, stride in the 1x1 conv): it loads
    into the torchvision-layout backbone without error, so the checkpointer says what it is."""
    caffe2 = tmp_path / "R-50.pkl"
    with open(caffe2, "wb") as f:
        pickle.dump({"conv1_w": np.zeros((64, 3, 7, 7), np.float32)}, f)
    messages = _load_and_capture_warnings(caffe2)
    assert any("Caffe2" in m and "convert-torchvision-to-d2.py" in m for m in messages), messages

    torchvision_converted = tmp_path / "R-50-torchvision.pkl"
    with open(torchvision_converted, "wb") as f:
        pickle.dump({"model": {"weight": np.zeros((2, 3), np.float32)}, "__author__": "torchvision",
                     "matching_heuristics": True}, f)
    assert not any("Caffe2" in m for m in _load_and_capture_warnings(torchvision_converted))
