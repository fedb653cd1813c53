"""deformable_family: the deformable family of query-based detectors for detectron2.

Subpackages: ``layers`` (the deformable-sampling op, attention modules, position encodings),
``modeling`` (backbones, matcher, losses, criterion, meta-architectures), ``data`` (mappers and
dataset registration), ``evaluation``, ``checkpoint`` (converters of released weights),
``engine`` (training helpers used by ``train_net.py``) and ``model_zoo`` (the configs by name).
"""

__version__ = "0.1.0"

import warnings  # noqa: E402

# The compiled extension deformable_family._C links against torch's libraries: load them first.
import torch  # noqa: E402,F401

# fvcore.nn and detectron2.modeling (imported by every model here) call torch.jit.script at import,
# which recent torch (2.14 here) deprecates with a FutureWarning that a user of this package cannot
# act on. Import them here once with that one warning silenced; torch.jit.script called anywhere
# else still warns. (Without detectron2 nothing is imported here: collect_env still reports.)
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
    )
    try:
        import fvcore.nn  # noqa: E402,F401
        import detectron2.modeling  # noqa: E402,F401
    except ImportError:
        pass
