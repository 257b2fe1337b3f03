"""Which implementation of the hot ops runs: resolution of ``backend=`` and why one is unusable."""

from __future__ import annotations

import torch

OP_BACKENDS = ("torch", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name where it cannot run."""


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run the ops on tensors on ``device``, else why it cannot."""
    if backend == "torch":
        return None
    if backend in OP_BACKENDS:
        return "not implemented in this version of mamlfast"
    return f"unknown backend {backend!r}; choose one of auto, {', '.join(OP_BACKENDS)}"


def resolve(backend: str, device: torch.device) -> str:
    """The op backend that runs for ``backend`` on ``device``: ``auto`` takes the fastest usable."""
    if backend == "auto":
        return next(name for name in ("cuda", "triton", "torch") if unavailable_reason(name, device) is None)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} is not available: {reason}")
    return backend


def availability(device: torch.device) -> dict[str, str | None]:
    """Each op backend mapped to None (usable on ``device``) or the reason it is not."""
    return {name: unavailable_reason(name, device) for name in OP_BACKENDS}
