"""The LSLR update of every adapted parameter of every task in one op.

All adapted tensors of B tasks live in one flat buffer [B, P]; ``segment_ids`` [P] says
which parameter tensor each column belongs to, and ``lrs`` [T] holds the current inner
step's learning rate of each of the T tensors:

    out[b, p] = params[b, p] - lrs[segment_ids[p]] * grads[b, p]

differentiable in ``params``, ``grads`` and ``lrs``.
"""

from __future__ import annotations

import importlib

import torch

from .backends import resolve


def lslr_update(
    params: torch.Tensor,
    grads: torch.Tensor,
    lrs: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One gradient step of ``params`` [B, P] with a learning rate per parameter tensor."""
    _check_arguments(params, grads, lrs, segment_ids)
    implementation = _IMPLEMENTATIONS[resolve(backend, params.device, params.dtype)]
    return implementation(params, grads, lrs, segment_ids)


def segment_ids_for(sizes: list[int], device: torch.device | None = None) -> torch.Tensor:
    """[P] index of the tensor each column belongs to, for tensors of ``sizes`` laid end to end."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                   torch.tensor(sizes, device=device))


def _check_arguments(params, grads, lrs, segment_ids) -> None:
    if params.dim() != 2 or grads.shape != params.shape:
        raise ValueError(f"params and grads must both be [B, P], got {tuple(params.shape)} and {tuple(grads.shape)}")
    if lrs.dim() != 1 or (lrs.shape[0] == 0 and params.shape[1]):
        raise ValueError(f"lrs must be [T], one rate per segment id, got {tuple(lrs.shape)}")
    for name, t in (("grads", grads), ("lrs", lrs)):
        if t.dtype != params.dtype or t.device != params.device:
            raise ValueError(f"{name} must have params' dtype {params.dtype} and device {params.device}, "
                             f"got {t.dtype} on {t.device}")
    if not params.is_floating_point():
        raise ValueError(f"params must be a floating-point tensor, got {params.dtype}")
    if (segment_ids.shape != (params.shape[1],) or segment_ids.dtype not in (torch.int32, torch.int64)
            or segment_ids.device != params.device):
        raise ValueError(f"segment_ids must be an int32 or int64 tensor [P]=[{params.shape[1]}] on {params.device}, "
                         f"got {segment_ids.dtype} {tuple(segment_ids.shape)} on {segment_ids.device}")


def _torch_lslr_update(params, grads, lrs, segment_ids):
    return params - lrs[segment_ids] * grads


def _fused_lslr_update(kernels, params, grads, lrs, segment_ids):
    """The update by ``kernels`` (a module like ``lslr_triton.py``), as out = params + (-lrs)[seg] * grads.
    The kernels read every tensor as contiguous: they get them so."""
    return _SegmentAxpy.apply(grads, -lrs, params, segment_ids.contiguous(), kernels)


class _SegmentAxpy(torch.autograd.Function):
    """out = base + s[segment] * x, with ``base`` optional. Its derivatives are again
    segment_axpy and segment_dot, so it is differentiable to any order."""

    @staticmethod
    def forward(ctx, x, s, base, segment, kernels):
        ctx.save_for_backward(x, s, segment)
        ctx.kernels, ctx.has_base = kernels, base is not None
        return kernels.segment_axpy(x.contiguous(), s.contiguous(), segment,
                                    None if base is None else base.contiguous())

    @staticmethod
    def backward(ctx, grad_out):
        x, s, segment = ctx.saved_tensors
        needs_x, needs_s, needs_base = ctx.needs_input_grad[:3]
        grad_x = _SegmentAxpy.apply(grad_out, s, None, segment, ctx.kernels) if needs_x else None
        grad_s = _SegmentDot.apply(grad_out, x, segment, s.shape[0], ctx.kernels) if needs_s else None
        return grad_x, grad_s, grad_out if needs_base and ctx.has_base else None, None, None


class _SegmentDot(torch.autograd.Function):
    """out[t] = sum of x * y over all rows and the columns of segment t: [T]."""

    @staticmethod
    def forward(ctx, x, y, segment, segments, kernels):
        ctx.save_for_backward(x, y, segment)
        ctx.kernels = kernels
        return kernels.segment_dot(x.contiguous(), y.contiguous(), segment, segments)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, segment = ctx.saved_tensors
        needs_x, needs_y = ctx.needs_input_grad[:2]
        grad_x = _SegmentAxpy.apply(y, grad_out, None, segment, ctx.kernels) if needs_x else None
        grad_y = _SegmentAxpy.apply(x, grad_out, None, segment, ctx.kernels) if needs_y else None
        return grad_x, grad_y, None, None, None


def _with_kernels(module: str):
    """The fused update with the kernels of ``lslr_<module>.py``, imported at the first call."""
    def implementation(*args):
        return _fused_lslr_update(importlib.import_module(f".lslr_{module}", __package__), *args)
    return implementation


_IMPLEMENTATIONS = {
    "torch": _torch_lslr_update,
    "triton": _with_kernels("triton"),
    "cuda": _with_kernels("extension"),
    "cpp": _with_kernels("extension"),
}
# the backends with kernels of their own for this op
FUSED_BACKENDS = tuple(name for name in _IMPLEMENTATIONS if name != "torch")
