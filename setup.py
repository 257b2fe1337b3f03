"""Build of mamlfast: the Python package, and the CUDA extension mamlfast._C where it can be built.

The extension is built when torch is a CUDA build and a usable CUDA toolkit is found (see
``find_cuda_toolkit``); otherwise the pure-Python package is installed and one line says why.
``FORCE_CUDA=1`` makes a missing toolkit an error; ``MAMLFAST_NO_CUDA=1`` skips the extension.
Architectures: sm_80 and sm_90 plus PTX, unless TORCH_CUDA_ARCH_LIST says otherwise. torch is
never installed or replaced: build with ``pip install --no-build-isolation`` against the torch
already present. The outcome is recorded in ``mamlfast/_build.json``, so that ``mamlfast info``
and ``backend="cuda"`` can say why the extension is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SOURCES = (ROOT / "csrc" / "sources.txt").read_text().split()  # the one list, shared with CMakeLists.txt
BUILD_RECORD = ROOT / "mamlfast" / "_build.json"
CONVENTIONAL_TOOLKIT = Path("/usr/local/cuda")
REINSTALL = "then reinstall mamlfast with pip install --no-build-isolation -e ."


def say(message: str) -> None:
    print(f"mamlfast: {message}", flush=True)


def toolkit_problem(folder: Path) -> str | None:
    """None if ``folder`` holds a CUDA toolkit the build can use (headers and nvcc), else what it lacks."""
    for needed in ("include/cuda_runtime_api.h", "bin/nvcc"):
        if not (folder / needed).is_file():
            return f"{folder} has no {needed}"
    return None


def nvcc_reported_toolkit(nvcc: str) -> Path | None:
    """The toolkit folder that ``nvcc`` itself reports (its dry run's TOP), also behind a wrapper script."""
    try:
        report = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", report.stdout + report.stderr, re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def find_cuda_toolkit(environ=os.environ, conventional: Path = CONVENTIONAL_TOOLKIT) -> tuple[Path | None, str]:
    """(toolkit folder, how it was found), or (None, why no usable toolkit was found).

    In order: CUDA_HOME or CUDA_PATH where set (and then only that); the folder above the
    ``nvcc`` on PATH, torch's own guess; the folder ``nvcc`` reports for itself, which differs
    when that ``nvcc`` is a wrapper script or a link; the conventional ``/usr/local/cuda``.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(variable):
            folder = Path(environ[variable])
            problem = toolkit_problem(folder)
            return (None, f"{variable} is set, but {problem}") if problem else (folder, f"{variable}")
    candidates = []
    nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
    if nvcc:
        candidates.append((Path(nvcc).parent.parent, f"the folder above {nvcc}"))
        reported = nvcc_reported_toolkit(nvcc)
        if reported:
            candidates.append((reported, f"reported by {nvcc}"))
    candidates.append((conventional, "the conventional location"))
    for folder, how in candidates:
        if toolkit_problem(folder) is None:
            return folder, how
    looked = ", ".join(str(folder) for folder, _ in candidates)
    return None, f"no CUDA toolkit found (nvcc {'at ' + nvcc if nvcc else 'not on PATH'}; looked in {looked})"


def toolkit_version(folder: Path) -> str | None:
    """The CUDA release of the toolkit in ``folder`` (e.g. "13.0"), from its nvcc."""
    try:
        report = subprocess.run([str(folder / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", report)
    return match.group(1) if match else None


def extension_plan(torch) -> tuple[Path | None, str]:
    """(toolkit, how it was found) to build the extension with, or (None, why it is not built)."""
    if os.environ.get("MAMLFAST_NO_CUDA") == "1":
        return None, "MAMLFAST_NO_CUDA=1 was set"
    if torch is None:
        return None, "torch was not installed when mamlfast was built (install torch first)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build (install a CUDA build of torch, {REINSTALL})"
    toolkit, how = find_cuda_toolkit()
    if toolkit is None:
        return None, f"{how} (install CUDA {torch.version.cuda} or set CUDA_HOME to its folder, {REINSTALL})"
    version = toolkit_version(toolkit)
    if version is None or version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, (f"the CUDA toolkit at {toolkit} is release {version}, but torch {torch.__version__} "
                      f"was built with CUDA {torch.version.cuda} (the major versions must agree: set CUDA_HOME "
                      f"to a matching toolkit, {REINSTALL})")
    return toolkit, f"{how}, release {version}"


def write_build_record(record: dict) -> None:
    """Write ``mamlfast/_build.json`` whole or not at all (a temporary file, then a rename)."""
    temporary = BUILD_RECORD.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, BUILD_RECORD)


def cuda_extension_build():
    """(ext_modules, cmdclass) for the CUDA extension, or empty ones with the reason said and recorded."""
    try:
        import torch
    except ImportError:
        torch = None
    torch_version = torch.__version__ if torch else None
    toolkit, how = extension_plan(torch)
    if toolkit is None:
        if os.environ.get("FORCE_CUDA") == "1":
            raise SystemExit(f"mamlfast: FORCE_CUDA=1, but the CUDA extension cannot be built: {how}")
        say(f"not building the CUDA extension (backend='cuda' will be unavailable): {how}")
        write_build_record(dict(extension=None, reason=how, torch=torch_version))
        for stale in (ROOT / "mamlfast").glob("_C.*"):  # an earlier in-place build must not load instead
            stale.unlink()
        return [], {}
    # torch.utils.cpp_extension reads the toolkit from CUDA_HOME when it is first imported
    os.environ["CUDA_HOME"] = str(toolkit)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    say(f"building the CUDA extension for {os.environ['TORCH_CUDA_ARCH_LIST']} with the toolkit at {toolkit} "
        f"({how})")
    write_build_record(dict(extension="cuda", toolkit=str(toolkit), torch=torch_version))
    extension = CUDAExtension(
        "mamlfast._C", sources=SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]})
    return [extension], {"build_ext": BuildExtension}


if __name__ == "__main__":
    ext_modules, cmdclass = cuda_extension_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
