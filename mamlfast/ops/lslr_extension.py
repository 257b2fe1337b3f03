"""The compiled extension's LSLR kernels, with the Triton module's interface.

The operators ``torch.ops.mamlfast.*`` run csrc/lslr_cpu.cpp on CPU tensors (backend ``cpp``)
and csrc/lslr.cu on CUDA tensors (backend ``cuda``): the dispatcher picks by device. Tensors come
contiguous (lslr.py makes them so), as the operators require.
"""

from __future__ import annotations

import torch

from . import extension

extension.require()


def segment_axpy(x, s, segment, base):
    return torch.ops.mamlfast.segment_axpy(x, s.to(x.dtype), segment, base)


def segment_dot(x, y, segment, segments):
    return torch.ops.mamlfast.segment_dot(x, y, segment, segments)
