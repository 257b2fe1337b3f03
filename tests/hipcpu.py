"""The CUDA kernels (csrc/*.cu) on the CPU, through AMD's HIP CPU runtime (HIP-CPU), for the
tests marked ``hipcpu``.

The .cu files are compiled as C++ by the host compiler, against HIP-CPU (``$HIP_CPU_ROOT``) and
TBB, with csrc/hipcpu/ first on the include path (CUDA's runtime names on HIP-CPU's) and
csrc/hipcpu/launchers.cpp, a C interface to the launchers of csrc/kernels.h. The library is
loaded with ctypes, so that HIP-CPU's headers and torch's never meet in one translation unit, and
called with the data pointers of CPU tensors. The functions below take and return tensors as the
operators ``torch.ops.mamlfast.*`` do on CUDA tensors (csrc/bindings.cpp), except that every
output and workspace starts as NaN (all bits set), so that a value a kernel fails to write shows.

The build lands in build/hipcpu/, under a key of everything it is made of (sources, compiler,
flags, HIP-CPU's folder): a changed kernel source is rebuilt at the next run, in about a minute on
two cores. ``MAMLFAST_HIPCPU_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer,
whose runtime must then be loaded first (README: the hipcpu tests).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from mamlfast.ops.batch_norm import KERNEL_VARIANTS

ROOT = Path(__file__).parents[1]
CSRC = ROOT / "csrc"
BUILDS = ROOT / "build" / "hipcpu"
UNITS = [CSRC / "batch_norm.cu", CSRC / "lslr.cu", CSRC / "hipcpu" / "launchers.cpp"]
# -O1: the tests' sizes run in seconds, and the build stays near a minute on two cores
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread"]
# HIP-CPU's fibers switch stacks, which AddressSanitizer's stack checks cannot follow
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                  "--param", "asan-stack=0"]
PROJECT_COPY = "../shared/third_party/hip-cpu"

# csrc/kernels.h's enumerations
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
INDEX_TYPES = {torch.int32: 0, torch.int64: 1}


class BuildError(RuntimeError):
    """HIP-CPU and TBB are there, but the kernels did not compile or link: a failure, never a skip."""


def sanitizing() -> bool:
    return os.environ.get("MAMLFAST_HIPCPU_SANITIZE") == "1"


def compiler() -> str | None:
    return shutil.which((os.environ.get("CXX") or "c++").split()[0])


@functools.cache
def unavailable_reason() -> str | None:
    """None if HIP-CPU, TBB and a C++ compiler are here, else what is missing, in words a user can act on."""
    root = os.environ.get("HIP_CPU_ROOT")
    if not root:
        return f"HIP_CPU_ROOT is not set (the folder of AMD's HIP CPU runtime; this project's copy: {PROJECT_COPY})"
    if not (Path(root) / "include" / "hip" / "hip_runtime.h").is_file():
        return f"HIP_CPU_ROOT={root} holds no include/hip/hip_runtime.h (AMD's HIP CPU runtime)"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler found (install g++, or set CXX)"
    probe = subprocess.run([cxx, "-E", "-x", "c++", "-"], input="#include <tbb/version.h>\n", capture_output=True,
                           text=True)
    if probe.returncode:
        return "TBB is not installed (HIP-CPU needs it: on Debian or Ubuntu, apt-get install libtbb-dev)"
    if sanitizing() and "libasan" not in Path("/proc/self/maps").read_text():
        return ("MAMLFAST_HIPCPU_SANITIZE=1, but AddressSanitizer's runtime is not loaded: run pytest with "
                "LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0")
    return None


def _command(source: Path, output: Path) -> list[str]:
    root = Path(os.environ["HIP_CPU_ROOT"]).resolve()
    return [compiler(), *FLAGS, *(SANITIZE_FLAGS if sanitizing() else []), "-x", "c++", f"-I{CSRC / 'hipcpu'}",
            f"-I{root / 'include'}", "-c", str(source), "-o", str(output)]


def _build_key() -> str:
    """A digest of everything the library is made of: a change to any of it makes a new build."""
    digest = hashlib.sha256()
    sources = sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h"), *(CSRC / "hipcpu").iterdir()])
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout
    digest.update("\0".join([version, *_command(Path("source"), Path("object"))]).encode())
    return digest.hexdigest()[:16]


def build() -> Path:
    """The shared library of the kernels on HIP-CPU, built unless a build of the same sources exists."""
    library = BUILDS / _build_key() / "libmamlfast_hipcpu.so"
    if library.exists():
        return library
    BUILDS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILDS) as scratch:
        scratch = Path(scratch)
        objects = [scratch / f"{unit.name}.o" for unit in UNITS]
        compiles = [subprocess.Popen(_command(unit, obj), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    for unit, obj in zip(UNITS, objects)]
        for unit, process in zip(UNITS, compiles):
            output, _ = process.communicate()
            if process.returncode:
                raise BuildError(f"{unit.relative_to(ROOT)} did not compile against HIP-CPU:\n{output[-4000:]}")
        linked = scratch / library.name
        link = subprocess.run([compiler(), "-shared", *FLAGS, *(SANITIZE_FLAGS[:1] if sanitizing() else []),
                               *map(str, objects), "-o", str(linked), "-ltbb"], capture_output=True, text=True)
        if link.returncode:
            raise BuildError(f"the kernels on HIP-CPU did not link:\n{(link.stdout + link.stderr)[-4000:]}")
        # the folder appears whole or not at all, also when another process builds the same at once
        (scratch / "complete").mkdir()
        linked.rename(scratch / "complete" / library.name)
        try:
            os.rename(scratch / "complete", library.parent)
        except OSError:
            if not library.exists():
                raise
    for stale in BUILDS.iterdir():  # earlier sources' builds
        if stale.is_dir() and stale != library.parent and not stale.name.startswith("tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    return library


_SIGNATURES = {
    "mamlfast_hipcpu_set_multiprocessors": (None, [ctypes.c_int]),
    "mamlfast_hipcpu_error_string": (ctypes.c_char_p, [ctypes.c_int]),
    "mamlfast_batch_norm_workspace_bytes": (ctypes.c_size_t, [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_int]),
    "mamlfast_batch_norm_forward": (ctypes.c_int, [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_int]
                                    + [ctypes.c_void_p] * 3 + [ctypes.c_double] + [ctypes.c_void_p] * 5),
    "mamlfast_batch_norm_backward": (ctypes.c_int, [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_int]
                                     + [ctypes.c_void_p] * 9),
    "mamlfast_batch_norm_double_backward": (ctypes.c_int, [ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_int]
                                            + [ctypes.c_void_p] * 12),
    "mamlfast_segment_axpy": (ctypes.c_int, [ctypes.c_int] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5),
    "mamlfast_segment_dot_workspace_bytes": (ctypes.c_size_t, [ctypes.c_int] + [ctypes.c_int64] * 2),
    "mamlfast_segment_dot": (ctypes.c_int, [ctypes.c_int] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 5),
}


def library() -> ctypes.CDLL:
    """The loaded library; a failed build fails every later call at once, without building again."""
    loaded = _load()
    if isinstance(loaded, BuildError):
        raise loaded
    return loaded


@functools.cache
def _load() -> ctypes.CDLL | BuildError:
    try:
        lib = ctypes.CDLL(str(build()))
    except BuildError as error:
        return error
    for name, (result, arguments) in _SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = result, arguments
    return lib


def set_multiprocessors(count: int) -> None:
    """The multiprocessors the kernels see (0: HIP-CPU's, the CPU's cores), which decide how groups are split."""
    library().mamlfast_hipcpu_set_multiprocessors(count)


def _check(status: int, op: str) -> None:
    if status:
        message = library().mamlfast_hipcpu_error_string(status).decode()
        raise RuntimeError(f"mamlfast::{op} failed on HIP-CPU: {message}")


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _poisoned(*size, dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.full(size, float("nan"), dtype=dtype, device=like.device)


def _statistics_type(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _workspace(size: int) -> torch.Tensor:
    return torch.full((size,), 255, dtype=torch.uint8)


def _groups(x: torch.Tensor, weight: torch.Tensor, variant: str) -> tuple[int, int, int, int, int]:
    """GroupShape of x [N, B*C, H, W] (samples, groups, channels, pixels), and the variant's number."""
    return x.shape[0], x.shape[1], weight.shape[0], x.shape[2] * x.shape[3], KERNEL_VARIANTS.index(variant)


def batch_norm_workspace_bytes(x, weight, variant="default") -> int:
    return library().mamlfast_batch_norm_workspace_bytes(DTYPES[x.dtype], *_groups(x, weight, variant))


def batch_norm_forward(x, weight, bias, eps, variant="default"):
    shape = _groups(x, weight, variant)
    y = torch.full_like(x, float("nan"))
    stats = [_poisoned(x.shape[1], dtype=_statistics_type(x), like=x) for _ in range(3)]
    if shape[0] * shape[3] == 0:  # means of no values
        return y, *stats
    workspace = _workspace(batch_norm_workspace_bytes(x, weight, variant))
    _check(library().mamlfast_batch_norm_forward(DTYPES[x.dtype], *shape, *map(_pointer, (x, weight, bias)), eps,
                                                 *map(_pointer, (y, *stats, workspace))), "batch_norm_forward")
    return y, *stats


def batch_norm_backward(grad_out, x, weight, mean, rstd, variant="default"):
    shape = _groups(x, weight, variant)
    grad_x = torch.full_like(x, float("nan"))
    if shape[0] * shape[3] == 0:  # sums of none
        return grad_x, torch.zeros_like(mean), torch.zeros_like(mean)
    grad_weight, grad_bias = (torch.full_like(mean, float("nan")) for _ in range(2))
    workspace = _workspace(batch_norm_workspace_bytes(x, weight, variant))
    _check(library().mamlfast_batch_norm_backward(
        DTYPES[x.dtype], *shape,
        *map(_pointer, (grad_out, x, weight, mean, rstd, grad_x, grad_weight, grad_bias, workspace))),
        "batch_norm_backward")
    return grad_x, grad_weight, grad_bias


def batch_norm_double_backward(grad_out, x, weight, mean, rstd, gg_x, gg_weight, gg_bias, variant="default"):
    shape = _groups(x, weight, variant)
    grad_grad_out, grad_x = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    if shape[0] * shape[3] == 0:  # a sum of none
        return grad_grad_out, grad_x, torch.zeros_like(mean)
    grad_weight = torch.full_like(mean, float("nan"))
    workspace = _workspace(batch_norm_workspace_bytes(x, weight, variant))
    _check(library().mamlfast_batch_norm_double_backward(
        DTYPES[x.dtype], *shape, *map(_pointer, (grad_out, x, weight, mean, rstd, gg_x, gg_weight, gg_bias,
                                                 grad_grad_out, grad_x, grad_weight, workspace))),
        "batch_norm_double_backward")
    return grad_grad_out, grad_x, grad_weight


def segment_axpy(x, s, segment, base):
    out = torch.full_like(x, float("nan"))
    _check(library().mamlfast_segment_axpy(DTYPES[x.dtype], INDEX_TYPES[segment.dtype], *x.shape, s.shape[0],
                                           *map(_pointer, (x, s, segment, base, out))), "segment_axpy")
    return out


def segment_dot(x, y, segment, segments):
    dtype = DTYPES[x.dtype]
    out = _poisoned(segments, dtype=_statistics_type(x), like=x)
    workspace = _workspace(library().mamlfast_segment_dot_workspace_bytes(dtype, x.shape[1], segments))
    _check(library().mamlfast_segment_dot(dtype, INDEX_TYPES[segment.dtype], *x.shape, segments,
                                          *map(_pointer, (x, y, segment, out, workspace))), "segment_dot")
    return out.to(x.dtype)


# The interfaces of mamlfast/ops/batch_norm_extension.py and lslr_extension.py, for the ops'
# autograd functions: the cuda backend's path, with these kernels.
batch_norm_kernels = SimpleNamespace(
    forward=lambda x, weight, bias, eps, variant: batch_norm_forward(x, weight.to(x.dtype), bias.to(x.dtype), eps,
                                                                     variant),
    backward=lambda dy, x, weight, mean, rstd, variant: batch_norm_backward(dy, x, weight.to(x.dtype), mean, rstd,
                                                                            variant),
    double_backward=lambda dy, x, weight, mean, rstd, gdx, gdweight, gdbias, variant: batch_norm_double_backward(
        dy, x, weight.to(x.dtype), mean, rstd, gdx, gdweight.to(x.dtype), gdbias.to(x.dtype), variant))
lslr_kernels = SimpleNamespace(segment_axpy=lambda x, s, segment, base: segment_axpy(x, s.to(x.dtype), segment, base),
                               segment_dot=segment_dot)
