"""Build of prunepath and its compiled extension ``prunepath._C``.

Build against the torch already installed:  pip install --no-build-isolation .
(An isolated build would download a multi-GB CUDA torch just to compile against it.)
CUDA kernels (csrc/cuda) are compiled when torch has CUDA and nvcc is found;
otherwise the build is CPU-only. PRUNEPATH_NO_EXTENSION=1 skips the extension.
"""

import glob
import os
import shutil

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("PRUNEPATH_NO_EXTENSION", "0") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
        and os.environ.get("PRUNEPATH_NO_CUDA", "0") != "1"
    )
    if with_cuda:
        # no --use_fast_math: the kernels are memory-bound, and fp32 results must match the
        # float64 reference to ~1e-5 (accurate expf/erff/tanhf in the activations)
        nvcc = [
            "-O3",
            "-std=c++17",
            "-lineinfo",
            "--threads=4",
        ]
        # Hopper (wgmma-capable sm_90a) plus a portable target; PRUNEPATH_NVCC_GENCODE
        # (space-separated -gencode flags) overrides, e.g. to build one target quickly.
        nvcc += os.environ.get("PRUNEPATH_NVCC_GENCODE", "").split() or [
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_80,code=compute_80",
        ]
        ext = CUDAExtension(
            "prunepath._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx + ["-DPRUNEPATH_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "prunepath._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
