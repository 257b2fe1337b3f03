"""What the Triton kernels of the hot ops share: int32 indexing, and inputs aligned alike.

Triton specialises a kernel on whether each pointer is a multiple of 16 bytes, and lays out
its blocks accordingly (4 neighbouring float32 values per thread where aligned, 1 elsewhere),
which changes the order in which a block's values are summed. Inputs that the kernels reduce
are therefore passed 16-byte aligned, copied where they are not, so that every sum is made in
an order fixed by the shapes alone.
"""

from __future__ import annotations

import torch

INDEX_LIMIT = 2**31  # the kernels index memory with int32 offsets


def check_indexable(x: torch.Tensor, op: str) -> None:
    if x.numel() >= INDEX_LIMIT:
        raise ValueError(f"the Triton {op} kernels index in int32: {tuple(x.shape)} has too many values "
                         f"({x.numel()} >= 2**31)")


def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its memory starts on a 16-byte boundary, else an aligned copy."""
    return x if x.data_ptr() % 16 == 0 else x.clone(memory_format=torch.contiguous_format)
