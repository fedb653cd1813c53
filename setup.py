#!/usr/bin/env python
"""Installs the ``deformable_family`` package and builds its extension ``deformable_family._C``.

The package lives in ``projects/deformable_family`` and is mapped with ``package_dir``, the way
detectron2 installs its own projects. The extension is compiled from ``kernels/``:

* every ``kernels/**/*.cpp`` always (the CPU kernel and the operator registration);
* every ``kernels/**/*.cu`` as well when a GPU is visible or ``FORCE_CUDA=1`` is set. Then
  ``CUDA_HOME`` must point at a CUDA toolkit (``/usr/local/cuda`` is tried when unset) and
  ``TORCH_CUDA_ARCH_LIST`` chooses the architectures; by default we build for
  Turing to Hopper (7.5 8.0 8.6 9.0, PTX for 9.0; CUDA 13 dropped Volta) when no GPU is visible.

The repository's ``configs/`` tree is installed as package data in
``deformable_family/model_zoo/configs/`` (as detectron2 installs its model-zoo configs), so that
``deformable_family.model_zoo`` finds configs by name after a non-editable install. An editable
install reads the checkout's ``configs/`` directly.

Build with ``pip install --no-build-isolation .`` or, for development, ``pip install
--no-build-isolation -e .`` (the extension needs the installed torch).
"""
import glob
import os
import shutil
import sys
from os import path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = path.dirname(path.abspath(__file__))
PACKAGE_DIR = path.join("projects", "deformable_family")
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0+PTX"
CONFIGS_DIR = "configs"
# Where the configs go inside the installed package (deformable_family.model_zoo looks there first).
INSTALLED_CONFIGS = path.join("deformable_family", "model_zoo", "configs")
# Configs, model-zoo metadata (model_zoo.yaml) and recorded model statistics (model_stats.json).
CONFIG_SUFFIXES = (".py", ".yaml", ".json")


def _version() -> str:
    with open(path.join(ROOT, PACKAGE_DIR, "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("__version__ not found in projects/deformable_family/__init__.py")


def _want_cuda(torch) -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available()


def _extensions():
    import torch
    from torch.utils import cpp_extension

    kernels = path.join(ROOT, "kernels")
    # Relative paths keep the build reproducible and the egg-info free of absolute paths.
    cpp_sources = sorted(path.relpath(p, ROOT) for p in glob.glob(path.join(kernels, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(path.relpath(p, ROOT) for p in glob.glob(path.join(kernels, "**", "*.cu"), recursive=True))
    extra_compile_args = {"cxx": ["-O3"]}
    extra_link_args = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp the CPU kernel runs on one thread.
        # The extension then links libgomp.so.1, the runtime torch itself loads.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    define_macros = []
    extension = cpp_extension.CppExtension
    sources = cpp_sources

    if cpp_extension.IS_HIP_EXTENSION:
        raise RuntimeError("deformable_family: ROCm builds are not supported; unset FORCE_CUDA to build the CPU kernel only")
    if _want_cuda(torch):
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError(
                "deformable_family: the CUDA kernel was requested (FORCE_CUDA=1 or a visible GPU) but no CUDA "
                "toolkit was found. Set CUDA_HOME to it, e.g. CUDA_HOME=/usr/local/cuda."
            )
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        extension = cpp_extension.CUDAExtension
        sources = cpp_sources + cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]

    return [
        extension(
            "deformable_family._C",
            sources,
            include_dirs=[kernels],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ], cpp_extension.BuildExtension


if "CUDA_HOME" not in os.environ and path.isdir("/usr/local/cuda"):
    # torch otherwise guesses /usr/local when nvcc is not on PATH, and cannot link cudart.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


class BuildPyWithConfigs(build_py):
    """build_py, plus a copy of the top-level ``configs/`` tree into the built package.

    A plain copy rather than ``package_data``: ``configs/`` lies outside the package's folder and
    stays there in the repository. Editable installs skip it (the model zoo then reads the
    checkout's ``configs/``).
    """

    def _config_files(self):
        files = []
        for folder, subfolders, names in os.walk(path.join(ROOT, CONFIGS_DIR)):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
            files += [path.join(folder, n) for n in sorted(names) if n.endswith(CONFIG_SUFFIXES)]
        return [path.relpath(f, path.join(ROOT, CONFIGS_DIR)) for f in files]

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        destination = path.join(self.build_lib, INSTALLED_CONFIGS)
        if path.isdir(destination):
            shutil.rmtree(destination)  # no stale config from an earlier build
        for relative in self._config_files():
            self.mkpath(path.dirname(path.join(destination, relative)))
            self.copy_file(path.join(ROOT, CONFIGS_DIR, relative), path.join(destination, relative))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        destination = path.join(self.build_lib, INSTALLED_CONFIGS)
        return outputs + [path.join(destination, f) for f in self._config_files()]


ext_modules, build_ext = _extensions()

setup(
    name="deformable_family",
    version=_version(),
    description="The deformable family of query-based detectors (Deformable DETR, SMCA, AdaMixer, ...) for detectron2",
    package_dir={"deformable_family": PACKAGE_DIR},
    packages=find_packages(where="projects", include=["deformable_family", "deformable_family.*"]),
    python_requires=">=3.10",  # the pinned torch 2.14 needs 3.10
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext, "build_py": BuildPyWithConfigs},
)
