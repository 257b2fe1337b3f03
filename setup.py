"""Build of mamlfast: the Python package, and the compiled extension mamlfast._C where it can be built.

The extension holds the hot ops' CPU kernels, built wherever torch and a C++ compiler are, and
their CUDA kernels, added when torch is a CUDA build and a usable CUDA toolkit is found (see
``find_cuda_toolkit``). Without a compiler the pure-Python package is installed and one line
says why. ``FORCE_CUDA=1`` makes a missing toolkit an error; ``MAMLFAST_NO_CUDA=1`` leaves the
CUDA kernels out. Architectures: sm_80 and sm_90 plus PTX, unless TORCH_CUDA_ARCH_LIST says
otherwise. torch is never installed or replaced: build with ``pip install --no-build-isolation``
against the torch already present, so that pip installs none of the build's own requirements
either: without a recent enough setuptools the build stops in one line that says what to install,
and without ninja it compiles one file at a time. The outcome is recorded in
``mamlfast/_build.json``, so that ``mamlfast info`` and the backends ``cpp`` and ``cuda`` can say why
they are missing.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent
VERSIONS = runpy.run_path(str(ROOT / "mamlfast" / "versions.py"))  # the oldest supported versions
# what a build without build isolation needs besides torch (pyproject.toml's build-system requires)
BUILD_TOOLS = f"'setuptools>={VERSIONS['SETUPTOOLS']}' ninja"
BUILD_RECORD = ROOT / "mamlfast" / "_build.json"
CONVENTIONAL_TOOLKIT = Path("/usr/local/cuda")
REINSTALL = "then reinstall mamlfast with pip install --no-build-isolation -e ."
# at::parallel_for, which the CPU kernels use, runs on torch's threads only in code compiled with
# OpenMP: on Linux the extension is, and shares the libgomp that torch loads; elsewhere its CPU
# kernels run on one thread.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["/O2"] if os.name == "nt" else ["-O3", *OPENMP_FLAGS]


def say(message: str) -> None:
    print(f"mamlfast: {message}", flush=True)


def build_tools_problem() -> str | None:
    """None if this Python holds a setuptools that can build mamlfast, else what is missing. pip needs the
    command bdist_wheel: setuptools' own from 70.1, the package wheel's with setuptools 64 (the first to
    install in editable mode) to 70.0."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    release = VERSIONS["release"](setuptools.__version__)
    if release >= VERSIONS["release"](VERSIONS["SETUPTOOLS"]) or (release >= (64,) and importable("wheel")):
        return None
    return (f"setuptools {setuptools.__version__} cannot build mamlfast, which needs setuptools "
            f"{VERSIONS['SETUPTOOLS']} or newer (or 64 or newer with the package wheel)")


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def find_ninja() -> bool:
    """Whether torch's build finds ninja, which compiles the sources in parallel. torch looks for it on
    PATH, where the Python package ninja's is not until its virtualenv is activated: it is put there."""
    try:
        import ninja
    except ImportError:
        return shutil.which("ninja") is not None
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    return True


def read_sources(path: Path = ROOT / "csrc" / "sources.txt") -> tuple[list[str], list[str]]:
    """(sources of every build, sources added where CUDA is built): the one list, shared with CMakeLists.txt."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return ([line for line in lines if not line.startswith("cuda:")],
            [line.removeprefix("cuda:").strip() for line in lines if line.startswith("cuda:")])


def cxx_compiler(environ=os.environ) -> str | None:
    """The C++ compiler torch's extension build runs (CXX, else the platform's default), if installed."""
    command = environ.get("CXX") or ("cl" if os.name == "nt" else "c++")
    return shutil.which(command.split()[0], path=environ.get("PATH", ""))


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


def cuda_plan(torch) -> tuple[Path | None, str]:
    """(toolkit, how it was found) to build the CUDA kernels with, or (None, why they are not built)."""
    if os.environ.get("MAMLFAST_NO_CUDA") == "1":
        return None, "MAMLFAST_NO_CUDA=1 was set"
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


def skip_extension(reason: str, torch_version: str | None):
    """No extension: say and record why, and remove an earlier in-place build that must not load instead."""
    if os.environ.get("FORCE_CUDA") == "1":
        raise SystemExit(f"mamlfast: FORCE_CUDA=1, but the extension cannot be built: {reason}")
    say(f"not building the extension mamlfast._C (backends 'cpp' and 'cuda' will be unavailable): {reason}")
    write_build_record(dict(extension=None, reason=reason, torch=torch_version))
    for stale in (ROOT / "mamlfast").glob("_C.*"):
        stale.unlink()
    return [], {}


def extension_build():
    """(ext_modules, cmdclass) for the extension, CPU kernels with or without the CUDA ones, or empty
    ones; the decision is said and recorded."""
    try:
        import torch
    except ImportError:
        return skip_extension("torch was not installed when mamlfast was built (install torch first, "
                              f"{REINSTALL})", None)
    old_torch = VERSIONS["too_old"]("torch", torch.__version__, VERSIONS["TORCH"])
    if old_torch:
        raise SystemExit(f"mamlfast: {old_torch}: install a newer torch (https://pytorch.org), {REINSTALL}")
    if cxx_compiler() is None:
        return skip_extension(f"no C++ compiler found (install one, e.g. g++, or set CXX; {REINSTALL})",
                              torch.__version__)
    cpu_sources, cuda_sources = read_sources()
    toolkit, how = cuda_plan(torch)
    if toolkit is None:
        if os.environ.get("FORCE_CUDA") == "1":
            raise SystemExit(f"mamlfast: FORCE_CUDA=1, but the CUDA kernels cannot be built: {how}")
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        say(f"building the extension's CPU kernels only (backend='cuda' will be unavailable): {how}")
        write_build_record(dict(extension="cpu", reason=how, torch=torch.__version__))
        extension = CppExtension("mamlfast._C", sources=cpu_sources, extra_compile_args=CXX_FLAGS,
                                 extra_link_args=OPENMP_FLAGS)
        return [extension], {"build_ext": BuildExtension}
    # torch.utils.cpp_extension reads the toolkit from CUDA_HOME when it is first imported
    os.environ["CUDA_HOME"] = str(toolkit)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    say(f"building the extension's CPU kernels and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} with the "
        f"toolkit at {toolkit} ({how})")
    write_build_record(dict(extension="cuda", toolkit=str(toolkit), torch=torch.__version__))
    extension = CUDAExtension(
        "mamlfast._C", sources=cpu_sources + cuda_sources,
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
        extra_link_args=OPENMP_FLAGS)
    return [extension], {"build_ext": BuildExtension}


if __name__ == "__main__":
    if build_tools_problem():
        raise SystemExit(f"mamlfast: {build_tools_problem()}: pip install torch {BUILD_TOOLS} installs what the "
                         "build needs, beside the torch you have and within its requirements, then build again")
    if not find_ninja():
        say("ninja is not installed: compiling the extension one file at a time (pip install ninja compiles "
            "in parallel)")
    from setuptools import setup

    ext_modules, cmdclass = extension_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
