"""The backbone's 2x2 max pooling with stride 2: x [N, C, H, W] -> [N, C, H // 2, W // 2].

Every backend computes ``F.max_pool2d(x, 2)``, with the same values and gradients of every
order, bit for bit: ties go to the first maximum in row-major order. The ``cpp`` backend runs
the extension's CPU kernels (csrc/max_pool_cpu.cpp), since PyTorch's CPU forward for this layout
runs at 1 to 3% of memory bandwidth; on CUDA tensors every backend runs PyTorch's pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import resolve

FUSED_BACKENDS = ("cpp",)  # the backends with kernels of their own for this op


def max_pool2x2(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The maximum of each 2x2 window of ``x`` [N, C, H, W], windows at stride 2 (floor mode)."""
    if x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2 or not x.is_floating_point():
        raise ValueError(f"max_pool2x2 expects a floating-point x of shape [N, C, H, W] with H, W >= 2, "
                         f"got {x.dtype} {tuple(x.shape)}")
    if resolve(backend, x.device, x.dtype) in FUSED_BACKENDS:
        return _MaxPool2x2.apply(x.contiguous())
    return F.max_pool2d(x, 2)


class _MaxPool2x2(torch.autograd.Function):
    """Pools and records where each window's maximum is (argmax, one byte per window)."""

    @staticmethod
    def forward(ctx, x):
        out, argmax = torch.ops.mamlfast.max_pool2x2_forward(x)
        ctx.save_for_backward(argmax)
        ctx.input_size = x.shape[2:]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (argmax,) = ctx.saved_tensors
        return _ScatterToArgmax.apply(grad_out, argmax, ctx.input_size)


class _ScatterToArgmax(torch.autograd.Function):
    """The pooling's backward: each window's gradient where its maximum was, zeros elsewhere.

    Linear in the gradient, with _GatherAtArgmax as its adjoint: each is the other's derivative,
    so gradients of every order exist.
    """

    @staticmethod
    def forward(ctx, grad_out, argmax, input_size):
        ctx.save_for_backward(argmax)
        return torch.ops.mamlfast.max_pool2x2_backward(grad_out.contiguous(), argmax, *input_size)

    @staticmethod
    def backward(ctx, grad):
        (argmax,) = ctx.saved_tensors
        return _GatherAtArgmax.apply(grad, argmax), None, None


class _GatherAtArgmax(torch.autograd.Function):
    """Each window's value where the pooled input's maximum was."""

    @staticmethod
    def forward(ctx, x, argmax):
        ctx.save_for_backward(argmax)
        ctx.input_size = x.shape[2:]
        return torch.ops.mamlfast.max_pool2x2_double_backward(x.contiguous(), argmax)

    @staticmethod
    def backward(ctx, grad):
        (argmax,) = ctx.saved_tensors
        return _ScatterToArgmax.apply(grad, argmax, ctx.input_size), None
