"""A DetectionCheckpointer whose files are replaced atomically and that warns about Caffe2 weights."""
import logging
import os
import tempfile
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicDetectionCheckpointer", "atomic_write_bytes"]

logger = logging.getLogger(__name__)


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file in the same folder, fsync it, then ``os.replace``
    it onto ``path``: a crash at any point leaves either the old file or the new one, never a
    truncated file, and no temporary file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :class:`AtomicDetectionCheckpointer`)."""
    _atomic_write(path, lambda f: f.write(data))


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """Same as detectron2's ``DetectionCheckpointer``, but ``save`` never leaves a corrupt file in
    place of the last good checkpoint: the checkpoint and the ``last_checkpoint`` tag are written
    to temporary files in the same folder, fsynced, and moved into place with ``os.replace``.

    Only local folders are supported for ``save`` (remote PathManager handlers have no rename).

    ``load`` warns when the file is in detectron2's Caffe2 format (e.g. its
    ``ImageNetPretrained/MSRA/R-50.pkl``): those weights expect BGR input, pixel std 1 and the
    stride in the 1x1 conv, yet load without error into this family's torchvision-layout backbone.
    """

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        checkpoint = super().load(path, *args, **kwargs)
        if checkpoint.get("__author__") == "Caffe2":
            logger.warning(
                f"{path} holds detectron2's Caffe2 (MSRA) weights: trained on BGR images with pixel "
                "std 1 and the stride in the 1x1 conv, they do not match this torchvision-layout "
                "backbone (RGB, ImageNet mean/std, MODEL.RESNETS.STRIDE_IN_1X1=False) although they "
                "load. Use torchvision's ImageNet ResNet converted by detectron2's "
                "tools/convert-torchvision-to-d2.py instead."
            )
        return checkpoint

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:
            raise ValueError(f"AtomicDetectionCheckpointer: save_dir must be a local folder, got {self.save_dir!r}")
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode())
