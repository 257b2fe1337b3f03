"""Which implementation of the hot ops runs: resolution of ``backend=`` and why one is unusable."""

from __future__ import annotations

import functools
import logging
import os

import torch

from ..versions import TRITON, too_old
from . import self_check

OP_BACKENDS = ("torch", "cpp", "triton", "cuda")

# auto's choice, fastest first, per device type: the compiled kernels where they can run and agree
# with the torch backend (benchmarks/RESULTS.md has the measurements), else the pure PyTorch path
AUTO_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}

log = logging.getLogger(__name__)
_said_cannot_run: set = set()  # (backend, device type) auto passed over as unusable, once said


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name where it cannot run."""


class BackendDisagrees(BackendUnavailable):
    """A backend was asked for by name where its self-check found it disagrees with the torch backend."""


def interpreting_triton() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (slowly): for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_problem() -> str | None:
    """None if a Triton that mamlfast supports is installed, else what is wrong with it."""
    try:
        import triton
    except ImportError as error:
        return f"Triton is not installed ({error})"
    old = too_old("Triton", triton.__version__, TRITON)
    return f"{old}: install the Triton that your torch asks for" if old else None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run the ops on tensors on ``device``, else why it cannot."""
    if backend == "torch":
        return None
    if device.type == "meta" and backend in OP_BACKENDS:
        return _meta_reason(backend)
    if backend == "triton":
        if _triton_problem():
            return _triton_problem()
        if device.type != "cuda" and not interpreting_triton():
            return f"Triton kernels need CUDA tensors, got {device.type} ones (TRITON_INTERPRET=1 runs them on the CPU)"
        return None
    if backend == "cpp":
        from .extension import load_error
        if load_error():
            return load_error()
        if device.type != "cpu":
            return (f"the cpp backend runs the extension's CPU kernels on CPU tensors, got {device.type} ones "
                    "(backend='cuda' runs its CUDA kernels)")
        return None
    if backend == "cuda":
        from .extension import cuda_kernels_error
        if cuda_kernels_error():
            return cuda_kernels_error()
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} ones (backend='cpp' runs the CPU kernels)"
        return None
    return f"unknown backend {backend!r}; choose one of auto, {', '.join(OP_BACKENDS)}"


def _meta_reason(backend: str) -> str | None:
    """Meta tensors (shapes only, for dry runs) go through the extension's operators as through
    their fake kernels, so cpp and cuda trace them wherever the extension loads; Triton's launch."""
    if backend == "triton":
        return "Triton kernels cannot run on meta tensors (trace the cuda backend: it saves the same tensors)"
    from .extension import load_error
    return load_error()


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The op backend that runs for ``backend`` on ``device`` with tensors of ``dtype`` (default:
    torch's default dtype): ``auto`` takes the fastest usable one that agrees with the torch backend
    there, a named one must be usable and agree. A fused backend's first use on a device and dtype
    checks it (``self_check``)."""
    dtype = dtype or torch.get_default_dtype()
    if backend == "auto":
        return _auto(device, dtype)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")
    found = self_check.verdict(backend, device, dtype)
    if not found.agrees:
        raise BackendDisagrees(f"{found.problem()} (its self-check; backend='auto' passes it over)")
    return backend


def _auto(device: torch.device, dtype: torch.dtype, verdict_of=None) -> str:
    """The first usable backend of auto's preference that agrees with the torch backend, else torch.
    Each passed over is named in a warning, once per process: one that disagrees, and, when resolving
    for a run (``verdict_of`` None), one that cannot run here, so that a user on a slower path
    (an extension not built, or older than the Python code) learns why. ``verdict_of`` (default
    ``self_check.verdict``) may leave a backend unjudged (None): it counts as agreeing."""
    passed_over, cannot_run = [], []
    for name in AUTO_PREFERENCE.get(device.type, ()):
        reason = unavailable_reason(name, device)
        if reason is not None:
            cannot_run.append((name, reason))
            continue
        found = (verdict_of or self_check.verdict)(name, device, dtype)
        if found is None or found.agrees:
            break
        passed_over.append(found)
    else:
        name = "torch"
    if verdict_of is None:
        for skipped, reason in cannot_run:
            _say_cannot_run(skipped, device, reason, name)
    for found in passed_over:
        self_check.warn_fallback(found, name)
    return name


def _say_cannot_run(backend: str, device: torch.device, reason: str, instead: str) -> None:
    key = (backend, device.type)
    if key not in _said_cannot_run:
        _said_cannot_run.add(key)
        log.warning("backend='auto' cannot use %r on %s: %s; it takes %r instead", backend, device.type, reason,
                    instead)


def auto_by_known_verdicts(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What ``auto`` takes by the verdicts found so far (this process's, the records), checking
    nothing: a backend that has yet to be checked counts as agreeing."""
    return _auto(device, dtype or torch.get_default_dtype(), self_check.known)


def availability(device: torch.device) -> dict[str, str | None]:
    """Each op backend mapped to None (usable on ``device``) or the reason it is not."""
    return {name: unavailable_reason(name, device) for name in OP_BACKENDS}
