#!/usr/bin/env python
"""Install detectron2 v0.6 from PyPI's sdist ``pb1-detectron2==0.6``, without its compiled ops.

Why: detectron2's authors do not publish it on PyPI. With internet access, build it from its GitHub
source instead (then this script is not needed: set-up uses any detectron2 that already imports).
The one detectron2 on PyPI, ``pb1-detectron2==0.6``, ships without its C++ sources, so its
``setup.py`` cannot build ``detectron2._C``. We therefore:

1. download the sdist with pip (no other source is used);
2. install it with its extension list emptied;
3. put a stand-in ``detectron2/_C.py`` in its place, so that ``detectron2.layers`` imports, and any use
   of a missing op (rotated boxes, deformable conv, the fast COCO eval) raises an error that says
   detectron2 was installed without its compiled ops and how to get them;
4. keep ``Pillow<10`` and ``setuptools<81``: v0.6 uses ``Image.LINEAR`` at import time (removed in
   Pillow 10) and ``pkg_resources`` (removed in setuptools 81).

Usage: ``python tools/install_detectron2.py`` with the interpreter of the target environment.
"""
import glob
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
PINS = ["Pillow>=7.1,<10", "setuptools<81"]

STAND_IN = '''"""Stand-in for detectron2's compiled ops: this detectron2 was installed without them.

Written by deformable_family's tools/install_detectron2.py (PyPI sdist pb1-detectron2==0.6 ships no
C++ sources). Importing works; using any compiled op raises.
"""
DEFORMABLE_FAMILY_STAND_IN = True


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"detectron2._C.{name} is not available: detectron2 was installed without its compiled ops "
        "(PyPI sdist pb1-detectron2==0.6 ships no C++ sources). Rotated boxes, deformable convolution "
        "and the fast COCO evaluation need them. To get them, build detectron2 from its GitHub source, "
        "e.g. pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git', "
        "then re-run set-up with DF_USE_ACTIVE_ENV=1."
    )
'''


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="d2-sdist-") as tmp:
        # --no-build-isolation: the sdist's setup.py imports torch to compute its metadata.
        pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", tmp, SDIST)
        (archive,) = glob.glob(str(Path(tmp) / "*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        setup_py = src / "setup.py"
        text = setup_py.read_text()
        if "ext_modules=get_extensions()," not in text:
            raise SystemExit(f"{setup_py}: unexpected content, cannot drop its extension list")
        setup_py.write_text(text.replace("ext_modules=get_extensions(),", "ext_modules=[],"))
        (src / "detectron2" / "_C.py").write_text(STAND_IN)
        pip("install", "-q", "--no-build-isolation", *PINS, str(src))


if __name__ == "__main__":
    main()
