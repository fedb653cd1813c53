"""Print what deformable_family runs on: ``python -m deformable_family.collect_env``.

Reports Python, torch (and its CUDA), the GPUs, detectron2 (version, location, and whether its compiled
ops are present), which kernels of ``deformable_family._C`` are compiled, and the git commit of this
source tree (so that every run's log, and every figure taken from one, names the code it ran).
"""
import importlib
import os
import platform
import shutil
import subprocess
import sys
from typing import List, Tuple


def _detectron2_rows() -> List[Tuple[str, str]]:
    try:
        import detectron2
    except ImportError as e:
        return [("detectron2", f"not importable ({e})")]
    from deformable_family.utils.d2_compat import detectron2_has_compiled_ops

    ops = "yes" if detectron2_has_compiled_ops() else "no (installed without them: see README, 'detectron2')"
    return [
        ("detectron2", f"{detectron2.__version__} @ {os.path.dirname(detectron2.__file__)}"),
        ("detectron2 compiled ops", ops),
    ]


def source_commit() -> str:
    """``git rev-parse HEAD`` of the tree this package was imported from, with "+ local changes"
    when it differs from that commit; a sentence when it is not a git checkout."""
    folder = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", folder, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        # A copy installed into a virtualenv inside a clone is not that clone's source.
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return commit + (" + local changes" if changed else "")


def _kernel_rows() -> List[Tuple[str, str]]:
    try:
        extension = importlib.import_module("deformable_family._C")
    except ImportError as e:
        return [("deformable_family._C", f"not built ({e}); the PyTorch reference is used")]
    rows = [("deformable_family._C", extension.__file__)]
    try:
        from deformable_family.layers.ms_deform_attn_op import compiled_kernels

        kernels = ", ".join(compiled_kernels()) or "none"
    except ImportError:
        kernels = "unknown"
    rows.append(("ms_deform_attn kernels", kernels))
    return rows


def collect_env_info() -> str:
    import torch

    import deformable_family

    rows: List[Tuple[str, str]] = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs"),
        ("deformable_family", f"{deformable_family.__version__} @ {os.path.dirname(deformable_family.__file__)}"),
        ("deformable_family commit", source_commit()),
        ("torch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("torch built with CUDA", str(torch.version.cuda)),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    for index in range(torch.cuda.device_count()):
        capability = ".".join(map(str, torch.cuda.get_device_capability(index)))
        rows.append((f"GPU {index}", f"{torch.cuda.get_device_name(index)} (sm {capability})"))
    rows.append(("CUDA_HOME", os.environ.get("CUDA_HOME", "(unset)")))
    rows.append(("nvcc", shutil.which("nvcc") or "not on PATH"))
    rows.append(("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "(unset)")))
    rows += _detectron2_rows()
    rows += _kernel_rows()
    for name in ("torchvision", "fvcore", "pycocotools", "scipy", "cv2", "numpy", "PIL"):
        try:
            module = importlib.import_module(name)
            rows.append((name, getattr(module, "__version__", "unknown version")))
        except ImportError:
            rows.append((name, "not installed"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def main() -> None:
    print(collect_env_info())


if __name__ == "__main__":
    main()
