"""The installed environment: detectron2 (v0.6 without ops, or main), our extension, collect_env."""
import importlib
import subprocess
import sys

import pytest

from deformable_family.utils.d2_compat import detectron2_has_compiled_ops


@pytest.mark.parametrize("module", ["layers", "modeling", "engine", "data", "evaluation", "model_zoo", "config"])
def test_detectron2_subpackages_import(module):
    importlib.import_module(f"detectron2.{module}")


@pytest.mark.skipif(detectron2_has_compiled_ops(), reason="detectron2 has its compiled ops: nothing is missing")
def test_missing_detectron2_op_raises_clear_error():
    import torch
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match="installed without its compiled ops"):
        pairwise_iou_rotated(boxes, boxes)


def test_extension_is_built():
    # setup_env.sh builds it; a missing extension would silently fall back to the reference.
    importlib.import_module("deformable_family._C")


def test_collect_env_runs_as_module():
    out = subprocess.run(
        [sys.executable, "-m", "deformable_family.collect_env"], capture_output=True, text=True, check=True
    ).stdout
    fields = ("torch", "detectron2", "detectron2 compiled ops", "deformable_family._C", "ms_deform_attn kernels",
              "deformable_family commit")
    for field in fields:
        assert f"\n{field} " in out, f"collect_env output lacks {field!r}:\n{out}"
    expected = "yes" if detectron2_has_compiled_ops() else "no"
    line = next(line for line in out.splitlines() if line.startswith("detectron2 compiled ops"))
    assert line.split()[3] == expected


def test_collect_env_names_the_source_commit():
    import os

    from deformable_family.collect_env import source_commit

    import deformable_family

    folder = os.path.dirname(deformable_family.__file__)
    head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        assert source_commit() == "not a git checkout"
    else:
        assert source_commit().split()[0] == head.stdout.strip()
