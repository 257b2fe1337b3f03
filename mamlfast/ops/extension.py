"""Loading the compiled extension ``mamlfast._C``: the hot ops' CPU kernels, and their CUDA kernels
where the build found CUDA (csrc/)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

BUILD_RECORD = Path(__file__).parent.parent / "_build.json"
REINSTALL = "reinstall mamlfast with pip install --no-build-isolation -e . from its source folder"
# the operators torch.ops.mamlfast.* that the Python code calls, each with a CPU kernel
OPERATORS = ("batch_norm_forward", "batch_norm_backward", "batch_norm_double_backward", "segment_axpy",
             "segment_dot", "max_pool2x2_forward", "max_pool2x2_backward", "max_pool2x2_double_backward")
# arguments that operators gained after their first release, which a stale build lacks
LATER_ARGUMENTS = {"batch_norm_forward": "variant", "batch_norm_backward": "variant",
                   "batch_norm_double_backward": "variant"}
# the functions of the module mamlfast._C itself (the CPU memory pool, mamlfast.memory_pool)
FUNCTIONS = ("enable_memory_pool", "memory_pool_stats", "release_memory_pool")


@functools.cache
def load_error() -> str | None:
    """None if the extension loaded, else why not, in words a user can act on."""
    try:
        from .. import _C
    except ImportError as error:
        return _why_not_loaded(error, build_record())
    # an editable install whose sources moved on since it was built
    missing = [f"operator mamlfast::{name}" for name in OPERATORS if not hasattr(torch.ops.mamlfast, name)]
    missing += [f"function {name}" for name in FUNCTIONS if not hasattr(_C, name)]
    if missing:
        return f"the extension mamlfast._C is older than mamlfast's Python code (it has no {missing[0]}): {REINSTALL}"
    for name, argument in LATER_ARGUMENTS.items():
        if argument not in {a.name for a in getattr(torch.ops.mamlfast, name).default._schema.arguments}:
            return (f"the extension mamlfast._C is older than mamlfast's Python code (mamlfast::{name} takes no "
                    f"argument {argument}): {REINSTALL}")
    _register_fakes()
    return None


def build_record() -> dict | None:
    """What setup.py recorded about the extension when mamlfast was installed (None: no record)."""
    try:
        return json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return None


def _why_not_loaded(error: ImportError, record: dict | None) -> str:
    if record is None:
        return f"the extension mamlfast._C is not built (mamlfast was installed without a build record): {REINSTALL}"
    if record.get("extension") is None:
        return f"the extension mamlfast._C is not built: {record.get('reason')}"
    if record.get("torch") != torch.__version__:
        return (f"the extension mamlfast._C was built for torch {record.get('torch')}, running torch "
                f"{torch.__version__}: {REINSTALL}")
    if "No module named" in str(error):
        return f"the extension's build did not complete (mamlfast._C is missing): {REINSTALL}"
    return f"the extension mamlfast._C did not load ({error})"


def cuda_kernels_error() -> str | None:
    """None if the loaded extension holds the CUDA kernels, else why not (the build record's reason)."""
    if load_error():
        return load_error()
    if torch._C._dispatch_has_kernel_for_dispatch_key("mamlfast::batch_norm_forward", "CUDA"):
        return None
    reason = (build_record() or {}).get("reason", "the build record does not say why")
    return f"mamlfast._C was built without its CUDA kernels: {reason}"


def require() -> None:
    error = load_error()
    if error:
        raise ImportError(error)


@functools.cache  # once per process: a second registration is an error
def _register_fakes() -> None:
    """Shapes of each op's outputs for meta tensors, so torch.library.opcheck and compilers can trace them."""
    def statistics(x):
        return x.new_empty(x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake("mamlfast::batch_norm_forward")
    def _(x, weight, bias, eps, variant=0):
        return torch.empty_like(x), statistics(x), statistics(x), statistics(x)

    @torch.library.register_fake("mamlfast::batch_norm_backward")
    def _(grad_out, x, weight, mean, rstd, variant=0):
        return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("mamlfast::batch_norm_double_backward")
    def _(grad_out, x, weight, mean, rstd, gg_x, gg_weight, gg_bias, variant=0):
        return torch.empty_like(x), torch.empty_like(x), torch.empty_like(mean)

    @torch.library.register_fake("mamlfast::segment_axpy")
    def _(x, s, segment, base):
        return torch.empty_like(x)

    @torch.library.register_fake("mamlfast::segment_dot")
    def _(x, y, segment, segments):
        return x.new_empty(segments)

    def windows(x):
        return (*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2)

    @torch.library.register_fake("mamlfast::max_pool2x2_forward")
    def _(x):
        return x.new_empty(windows(x)), x.new_empty(windows(x), dtype=torch.uint8)

    @torch.library.register_fake("mamlfast::max_pool2x2_backward")
    def _(grad_out, argmax, height, width):
        return grad_out.new_empty(*grad_out.shape[:2], height, width)

    @torch.library.register_fake("mamlfast::max_pool2x2_double_backward")
    def _(gg_x, argmax):
        return gg_x.new_empty(windows(gg_x))
