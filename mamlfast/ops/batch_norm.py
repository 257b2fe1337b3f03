"""Per-step batch norm of task-batched activations: statistics per (task, channel).

Activations of B tasks travel as one tensor ``x`` of shape [N, B*C, H, W] (tasks folded
into channels, the layout of a grouped convolution). Each (task, channel) pair is
normalised over its N*H*W values; the affine weight and bias [C] of the current inner
step are shared by all tasks. The running statistics [C] of that step move once per
call, towards the mean over tasks of the per-task batch mean and unbiased variance.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backends import resolve

# Shapes of the CUDA and Triton kernels (csrc/kernels.h: BatchNormVariant), measured against each other
# by benchmarks/kernels.py: "default", today's, runs unless asked; "overlapped" keeps more loads in
# flight per thread and splits groups over more blocks or programs per multiprocessor. The torch and
# cpp backends have one shape.
KERNEL_VARIANTS = ("default", "overlapped")


def task_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
    kernel_variant: str = "default",
) -> torch.Tensor:
    """Normalise ``x`` [N, B*C, H, W] per (task, channel) and apply ``weight``, ``bias`` [C].

    ``training=True`` normalises with the batch statistics and, if running statistics are
    given, updates them in place; ``training=False`` normalises with the running statistics.
    ``kernel_variant`` picks the shape of the cuda and triton backends' kernels (KERNEL_VARIANTS).
    """
    _check_arguments(x, weight, bias, running_mean, running_var, training)
    if kernel_variant not in KERNEL_VARIANTS:
        raise ValueError(f"kernel_variant must be one of {', '.join(KERNEL_VARIANTS)}, got {kernel_variant!r}")
    implementation = _IMPLEMENTATIONS[resolve(backend, x.device, x.dtype)]
    return implementation(x, weight, bias, running_mean, running_var, training, momentum, eps, kernel_variant)


def _check_arguments(x, weight, bias, running_mean, running_var, training) -> None:
    if x.dim() != 4:
        raise ValueError(f"task_batch_norm expects x of shape [N, B*C, H, W], got {tuple(x.shape)}")
    if weight.dim() != 1 or bias.shape != weight.shape or weight.shape[0] == 0:
        raise ValueError(f"weight and bias must both be [C] with C >= 1, got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"{name} must be a floating-point tensor on x's device {x.device}, "
                             f"got {t.dtype} on {t.device}")
    channels = weight.shape[0]
    if x.shape[1] % channels:
        raise ValueError(f"x has {x.shape[1]} channels, not a multiple of C={channels}")
    if x.shape[1] == 0:
        raise ValueError("x has no channels: task_batch_norm needs at least one task")
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if running_mean is None and not training:
        raise ValueError("training=False normalises with running statistics: give running_mean and running_var")
    for stat in (running_mean, running_var):
        if stat is not None and stat.shape != weight.shape:
            raise ValueError(f"running statistics must be [C]={tuple(weight.shape)}, got {tuple(stat.shape)}")


def _torch_task_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, kernel_variant=None):
    tasks = x.shape[1] // weight.shape[0]
    # [C] -> [B*C]: every task uses the same step's affine parameters
    weight, bias = weight.repeat(tasks), bias.repeat(tasks)
    if not training:
        return F.batch_norm(x, running_mean.repeat(tasks), running_var.repeat(tasks), weight, bias,
                            False, 0.0, eps)
    if running_mean is None or x.numel() == 0:  # no values: no statistics to move towards
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    # With momentum 1, batch_norm overwrites these [B*C] buffers with this batch's
    # per-(task, channel) mean and unbiased variance: the statistics come for free.
    batch_mean = x.new_zeros(x.shape[1])
    batch_var = x.new_zeros(x.shape[1])
    out = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    with torch.no_grad():
        # [B*C] -> [B, C] -> mean over tasks [C]
        running_mean.lerp_(batch_mean.view(tasks, -1).mean(0), momentum)
        running_var.lerp_(batch_var.view(tasks, -1).mean(0), momentum)
    return out


def _fused_task_batch_norm(kernels, x, weight, bias, running_mean, running_var, training, momentum, eps,
                           kernel_variant="default"):
    """Batch-statistics normalisation by ``kernels`` (a module like ``batch_norm_triton.py``) of the
    given variant, which read every tensor as contiguous: they get them so.

    Normalising with fixed running statistics is one affine map: the torch path does it.
    """
    if not training:
        return _torch_task_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    out, mean, var = _TaskBatchNorm.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), eps, kernels,
                                          kernel_variant)
    if running_mean is not None and x.numel():
        values = x.numel() // x.shape[1]
        with torch.no_grad():
            # [B*C] -> [B, C] -> mean over tasks [C]; the running variance is unbiased
            running_mean.lerp_(mean.view(-1, weight.shape[0]).mean(0).to(running_mean), momentum)
            unbiased = var.view(-1, weight.shape[0]).mean(0) * (values / max(values - 1, 1))
            running_var.lerp_(unbiased.to(running_var), momentum)
    return out


class _TaskBatchNorm(torch.autograd.Function):
    """Fused forward; its backward is itself differentiable (``_TaskBatchNormBackward``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernels, variant):
        out, mean, var, rstd = kernels.forward(x, weight, bias, eps, variant)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.kernels, ctx.variant = kernels, variant
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _TaskBatchNormBackward.apply(
            grad_out.contiguous(), x, weight, mean, rstd, ctx.kernels, ctx.variant)
        return grad_x, grad_weight, grad_bias, None, None, None


class _TaskBatchNormBackward(torch.autograd.Function):
    """The backward as an op of (grad_out, x, weight); mean and rstd are functions of x that
    the double-backward formulas differentiate analytically, so they get no gradient here."""

    @staticmethod
    def forward(ctx, grad_out, x, weight, mean, rstd, kernels, variant):
        grad_x, grad_weight, grad_bias = kernels.backward(grad_out, x, weight, mean, rstd, variant)
        ctx.save_for_backward(grad_out, x, weight, mean, rstd)
        ctx.kernels, ctx.variant = kernels, variant
        channels = weight.shape[0]
        # per (task, channel) [B*C] -> summed over tasks [C]
        return (grad_x, grad_weight.view(-1, channels).sum(0).to(weight.dtype),
                grad_bias.view(-1, channels).sum(0).to(weight.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_x, gg_weight, gg_bias):
        grad_out, x, weight, mean, rstd = ctx.saved_tensors
        gg_x = torch.zeros_like(x) if gg_x is None else gg_x.contiguous()
        gg_weight = torch.zeros_like(weight) if gg_weight is None else gg_weight
        gg_bias = torch.zeros_like(weight) if gg_bias is None else gg_bias
        grad_grad_out, grad_x, grad_weight = ctx.kernels.double_backward(
            grad_out, x, weight, mean, rstd, gg_x, gg_weight.contiguous(), gg_bias.contiguous(), ctx.variant)
        grad_weight = grad_weight.view(-1, weight.shape[0]).sum(0).to(weight.dtype)
        return grad_grad_out, grad_x, grad_weight, None, None, None, None


def _with_kernels(module: str):
    """The fused path with the kernels of ``batch_norm_<module>.py``, imported at the first call."""
    def implementation(*args):
        return _fused_task_batch_norm(importlib.import_module(f".batch_norm_{module}", __package__), *args)
    return implementation


_IMPLEMENTATIONS = {
    "torch": _torch_task_batch_norm,
    "triton": _with_kernels("triton"),
    "cuda": _with_kernels("extension"),
    "cpp": _with_kernels("extension"),
}
# the backends with kernels of their own for this op
FUSED_BACKENDS = tuple(name for name in _IMPLEMENTATIONS if name != "torch")
