"""deformable_family: the deformable family of query-based detectors for detectron2.

Subpackages: ``layers`` (the deformable-sampling op, attention modules, position encodings),
``modeling`` (backbones, matcher, losses, criterion, meta-architectures), ``data`` (mappers and
dataset registration), ``evaluation``, ``checkpoint`` (converters of released weights) and
``engine`` (training helpers used by ``train_net.py``).
"""

__version__ = "0.1.0"

# The compiled extension deformable_family._C links against torch's libraries: load them first.
import torch  # noqa: E402,F401
