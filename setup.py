"""Build of mamlfast: the Python package, and the CUDA extension mamlfast._C where CUDA is present.

The extension is built when a CUDA toolkit and a CUDA build of torch are found, or with
FORCE_CUDA=1; MAMLFAST_NO_CUDA=1 skips it. Architectures: sm_80 and sm_90 plus PTX, unless
TORCH_CUDA_ARCH_LIST says otherwise. torch is never installed or replaced: build with
``pip install --no-build-isolation`` against the torch already present.
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SOURCES = (ROOT / "csrc" / "sources.txt").read_text().split()  # the one list, shared with CMakeLists.txt


def say(message: str) -> None:
    print(f"mamlfast: {message}", flush=True)


def cuda_extension_build():
    """(ext_modules, cmdclass) for the CUDA extension, or empty ones with the reason said."""
    if os.environ.get("MAMLFAST_NO_CUDA") == "1":
        say("MAMLFAST_NO_CUDA=1: not building the CUDA extension (backend='cuda' will be unavailable)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        say("torch is not installed: not building the CUDA extension (install torch first, then "
            "pip install --no-build-isolation)")
        return [], {}
    if os.environ.get("FORCE_CUDA") != "1" and (CUDA_HOME is None or torch.version.cuda is None):
        reason = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        say(f"{reason}: not building the CUDA extension (backend='cuda' will be unavailable)")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    say(f"building the CUDA extension for {os.environ['TORCH_CUDA_ARCH_LIST']} with {CUDA_HOME}")
    extension = CUDAExtension(
        "mamlfast._C", sources=SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]})
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
