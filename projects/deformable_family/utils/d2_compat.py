"""What differs between detectron2 v0.6 (PyPI sdist, no compiled ops) and detectron2 main."""
import functools


@functools.lru_cache(maxsize=None)
def detectron2_has_compiled_ops() -> bool:
    """True when ``detectron2._C`` is detectron2's real extension, not the stand-in that
    ``tools/install_detectron2.py`` installs in its place."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "DEFORMABLE_FAMILY_STAND_IN", False)
