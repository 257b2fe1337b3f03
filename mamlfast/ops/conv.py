"""The backbone's convolution of all tasks at once: a grouped conv2d, stride 1, one group per task.

Every backend computes ``F.conv2d(x, weight, bias, padding=padding, groups=groups)`` and its
derivatives of every order. They differ in the second derivative, which second-order MAML needs
at every inner step. PyTorch's (``_convolution_double_backward``) computes the weight's part one
group at a time, from transposed copies of its inputs, and the input's part as a transposed
convolution; on the CPU that was about a quarter of the convolutions' time at omniglot-5w1s
(benchmarks/RESULTS.md). The ``cpp`` backend states the second derivative as two grouped
``convolution_backward`` calls and two grouped convolutions (_Conv2dBackward), the same maths in
the same grouped primitives as the forward and backward. On CUDA tensors every backend runs
PyTorch's until a GPU has measured both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import resolve

aten = torch.ops.aten
FUSED_BACKENDS = ("cpp",)  # the backends with code of their own for this op


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, padding: int, groups: int,
                   backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, groups=groups)``.

    x [N, G*C_in, H, W], weight [G*C_out, C_in, k, k], bias [G*C_out] or None.
    """
    if resolve(backend, x.device, x.dtype) in FUSED_BACKENDS:
        return _Conv2d.apply(x, weight, bias, padding, groups)
    return F.conv2d(x, weight, bias, padding=padding, groups=groups)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (padding, groups)
        return F.conv2d(x, weight, bias, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        wanted = tuple(ctx.needs_input_grad[:3])  # a missing bias needs no gradient
        grad_x, grad_weight, grad_bias = _Conv2dBackward.apply(grad_out, x, weight, ctx.geometry, wanted)
        return grad_x, grad_weight, grad_bias, None, None


def _convolution_backward(grad_out, x, weight, geometry, wanted):
    """(grad_x, grad_weight, grad_bias) of F.conv2d, each None where not ``wanted``."""
    padding, groups = geometry
    bias_sizes = [weight.shape[0]] if wanted[2] else None
    grads = aten.convolution_backward(grad_out, x, weight, bias_sizes, [1, 1], [padding, padding], [1, 1],
                                      False, [0, 0], groups, list(wanted))
    return tuple(grad if want else None for grad, want in zip(grads, wanted))


class _Conv2dBackward(torch.autograd.Function):
    """The convolution's backward as a function of (grad_out, x, weight).

    grad_x is linear in (grad_out, weight), grad_weight in (grad_out, x) and grad_bias in grad_out,
    so for upstream gradients (gg_x, gg_weight, gg_bias) of the three:
        d/d grad_out = conv(gg_x, weight) + conv(x, gg_weight) + gg_bias
        d/d x        = the input gradient of a convolution with weight gg_weight, at grad_out
        d/d weight   = the weight gradient of a convolution of gg_x, at grad_out
    Written with differentiable aten ops, so derivatives of higher order exist too.
    """

    @staticmethod
    def forward(ctx, grad_out, x, weight, geometry, wanted):
        ctx.set_materialize_grads(False)  # an output that nothing used gets None, not a tensor of zeros to convolve
        ctx.save_for_backward(grad_out, x, weight)
        ctx.geometry = geometry
        return _convolution_backward(grad_out, x, weight, geometry, wanted)

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        grad_out, x, weight = ctx.saved_tensors
        padding, groups = ctx.geometry
        need_grad_out, need_x, need_weight = ctx.needs_input_grad[:3]
        grad_grad_out = grad_x = grad_weight = None
        if need_grad_out:
            terms = []
            if gg_x is not None:
                terms.append(F.conv2d(gg_x, weight, None, padding=padding, groups=groups))
            if gg_weight is not None:
                terms.append(F.conv2d(x, gg_weight, None, padding=padding, groups=groups))
            if gg_bias is not None:
                terms.append(gg_bias.view(1, -1, 1, 1).expand_as(grad_out))
            grad_grad_out = sum(terms[1:], terms[0]) if terms else None
        if need_x and gg_weight is not None:
            grad_x = _convolution_backward(grad_out, x, gg_weight, ctx.geometry, (True, False, False))[0]
        if need_weight and gg_x is not None:
            grad_weight = _convolution_backward(grad_out, gg_x, weight, ctx.geometry, (False, True, False))[1]
        return grad_grad_out, grad_x, grad_weight, None, None
