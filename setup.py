"""Build of the compiled kernels.

* ``slsdeep_kernels._C``: the CPU extension (``csrc/ops.cpp`` + ``csrc/cpu``), always built.
* ``slsdeep_kernels._C_cuda``: the CUDA kernels (``csrc/cuda``) and their thin torch binding
  (``csrc/cuda_bind``), built only where torch is a CUDA build and nvcc is found.

Environment switches:
  SLSDEEP_KERNELS_NO_CUDA=1     never build the CUDA extension
  SLSDEEP_KERNELS_FORCE_CUDA=1  build it or fail loudly (no silent skip)
  TORCH_CUDA_ARCH_LIST          arch list when no GPU is visible (default "8.0;9.0")
  MAX_JOBS                      parallel compile jobs (default: min(cores, 4))
"""

import glob
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat)))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_build_reason():
    """Why the CUDA extension cannot be built here (None when it can)."""
    import torch

    if _flag("SLSDEEP_KERNELS_NO_CUDA"):
        return "SLSDEEP_KERNELS_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not home or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _extensions():
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fopenmp", "-DSLSDEEP_MODULE=_C"]
    extensions = [
        cpp_extension.CppExtension(
            "slsdeep_kernels._C",
            _sources("csrc/ops.cpp", "csrc/python_module.cpp", "csrc/cpu/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args=cxx_flags,
            extra_link_args=["-fopenmp"],
        )
    ]
    reason = _cuda_build_reason()
    if reason is not None:
        if _flag("SLSDEEP_KERNELS_FORCE_CUDA"):
            sys.exit(f"slsdeep-kernels: SLSDEEP_KERNELS_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"slsdeep-kernels: building the CPU extension only ({reason}).")
        return extensions
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    extensions.append(
        cpp_extension.CUDAExtension(
            "slsdeep_kernels._C_cuda",
            _sources("csrc/python_module.cpp", "csrc/cuda_bind/*.cpp", "csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": ["-O3", "-DSLSDEEP_MODULE=_C_cuda"], "nvcc": ["-O3"]},
        )
    )
    return extensions


os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 1, 4)))

setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
