"""The compiled extension's batch-norm kernels, with the Triton module's interface.

The operators ``torch.ops.mamlfast.*`` run csrc/batch_norm_cpu.cpp on CPU tensors (backend
``cpp``) and csrc/batch_norm.cu on CUDA tensors (backend ``cuda``): the dispatcher picks by device. Tensors come
contiguous (batch_norm.py makes them so), as the operators require.
"""

from __future__ import annotations

import torch

from . import extension
from .batch_norm import KERNEL_VARIANTS

extension.require()


def forward(x, weight, bias, eps, variant):
    return torch.ops.mamlfast.batch_norm_forward(x, weight.to(x.dtype), bias.to(x.dtype), eps,
                                                 KERNEL_VARIANTS.index(variant))


def backward(dy, x, weight, mean, rstd, variant):
    return torch.ops.mamlfast.batch_norm_backward(dy, x, weight.to(x.dtype), mean, rstd, KERNEL_VARIANTS.index(variant))


def double_backward(dy, x, weight, mean, rstd, gdx, gdweight, gdbias, variant):
    return torch.ops.mamlfast.batch_norm_double_backward(
        dy, x, weight.to(x.dtype), mean, rstd, gdx, gdweight.to(x.dtype), gdbias.to(x.dtype),
        KERNEL_VARIANTS.index(variant))
