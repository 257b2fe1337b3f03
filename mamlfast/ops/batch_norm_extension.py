"""The CUDA extension's batch-norm kernels (csrc/batch_norm.cu), with the Triton module's interface."""

from __future__ import annotations

import torch

from . import cuda_extension

cuda_extension.require()


def forward(x, weight, bias, eps):
    return torch.ops.mamlfast.batch_norm_forward(x, weight.to(x.dtype).contiguous(), bias.to(x.dtype).contiguous(),
                                                 eps)


def backward(dy, x, weight, mean, rstd):
    return torch.ops.mamlfast.batch_norm_backward(dy, x, weight.to(x.dtype).contiguous(), mean, rstd)


def double_backward(dy, x, weight, mean, rstd, gdx, gdweight, gdbias):
    return torch.ops.mamlfast.batch_norm_double_backward(
        dy, x, weight.to(x.dtype).contiguous(), mean, rstd, gdx, gdweight.to(x.dtype), gdbias.to(x.dtype))
