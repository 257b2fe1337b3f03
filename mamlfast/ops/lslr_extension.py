"""The CUDA extension's LSLR kernels (csrc/lslr.cu), with the Triton module's interface."""

from __future__ import annotations

import torch

from . import cuda_extension

cuda_extension.require()


def segment_axpy(x, s, segment, base):
    return torch.ops.mamlfast.segment_axpy(x, s.to(x.dtype).contiguous(), segment, base)


def segment_dot(x, y, segment, segments):
    return torch.ops.mamlfast.segment_dot(x, y, segment, segments)
