"""Triton kernels of the LSLR update over the flat [B, P] buffer of adapted parameters.

Two operations make the update and all its derivatives, of any order (see ``lslr.py``):

    segment_axpy   out[b, p] = base[b, p] + s[segment[p]] * x[b, p]
    segment_dot    out[t]    = sum over b and the columns p of segment t of x[b, p] * y[b, p]

Segment ids may come in any order. ``segment_dot`` sums without atomics, in an order fixed by
the shapes: each program sums a block of columns down the rows, then per segment across the
block (PARTIAL [T, blocks]); a second launch adds each segment's partial sums in block order.
Segment ids outside [0, T) are caught by device assertions when Triton runs with TRITON_DEBUG=1.
Every tensor comes contiguous (lslr.py makes them so): the kernels index them as such.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import aligned, check_indexable

BLOCK = 1024
COMBINE_BLOCK = 256  # partial sums per iteration of the second pass


@triton.jit
def _segment_axpy_kernel(X, S, SEGMENT, BASE, OUT, rows, P, segments, BLOCK: tl.constexpr, HAS_BASE: tl.constexpr):
    """A block of columns, down the rows: each column's segment id and rate are read once."""
    columns = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < P
    segment = tl.load(SEGMENT + columns, mask=mask, other=0)
    tl.device_assert((segment >= 0) & (segment < segments), "segment id out of range")
    scale = tl.load(S + segment, mask=mask, other=0.0)
    for row in range(0, rows):
        out = scale * tl.load(X + row * P + columns, mask=mask, other=0.0)
        if HAS_BASE:
            out += tl.load(BASE + row * P + columns, mask=mask, other=0.0)
        tl.store(OUT + row * P + columns, out, mask=mask)


@triton.jit
def _segment_dot_partials_kernel(X, Y, SEGMENT, PARTIAL, rows, P, segments,
                                 BLOCK: tl.constexpr, SEGMENTS: tl.constexpr, ACC: tl.constexpr):
    program = tl.program_id(0)
    blocks = tl.num_programs(0)
    columns = program * BLOCK + tl.arange(0, BLOCK)
    mask = columns < P
    segment = tl.load(SEGMENT + columns, mask=mask, other=0)
    tl.device_assert((segment >= 0) & (segment < segments), "segment id out of range")
    total = tl.zeros([BLOCK], ACC)
    for row in range(0, rows):
        x = tl.load(X + row * P + columns, mask=mask, other=0.0).to(ACC)
        y = tl.load(Y + row * P + columns, mask=mask, other=0.0).to(ACC)
        total += x * y
    first = tl.min(tl.where(mask, segment, segments), 0)
    last = tl.max(tl.where(mask, segment, -1), 0)
    ids = tl.arange(0, SEGMENTS)
    tl.store(PARTIAL + ids * blocks + program, tl.zeros([SEGMENTS], ACC),
             mask=(ids < segments) & ((ids < first) | (ids > last)))
    for t in range(first, last + 1):
        tl.store(PARTIAL + t * blocks + program, tl.sum(tl.where(mask & (segment == t), total, 0.0), 0))


@triton.jit
def _segment_dot_combine_kernel(PARTIAL, OUT, blocks, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    total = tl.zeros([BLOCK], PARTIAL.dtype.element_ty)
    for start in range(0, blocks, BLOCK):
        parts = start + tl.arange(0, BLOCK)
        total += tl.load(PARTIAL + t * blocks + parts, mask=parts < blocks, other=0.0)
    tl.store(OUT + t, tl.sum(total, 0))


def segment_axpy(x: torch.Tensor, s: torch.Tensor, segment: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    check_indexable(x, "LSLR")
    rows, columns = x.shape
    out = torch.empty_like(x)
    if x.numel():
        _segment_axpy_kernel[(triton.cdiv(columns, BLOCK),)](x, s.to(x.dtype), segment, x if base is None else base,
                                                            out, rows, columns, s.shape[0], BLOCK=BLOCK,
                                                            HAS_BASE=base is not None)
    return out


def segment_dot(x: torch.Tensor, y: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    check_indexable(x, "LSLR")
    x, y = aligned(x), aligned(y)
    rows, columns = x.shape
    accumulate = tl.float64 if x.dtype == torch.float64 else tl.float32
    out = torch.empty(segments, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    blocks = triton.cdiv(columns, BLOCK)
    if not (segments and blocks):
        return out.zero_().to(x.dtype)  # sums of no values
    partial = torch.empty(segments * blocks, device=x.device, dtype=out.dtype)
    _segment_dot_partials_kernel[(blocks,)](x, y, segment, partial, rows, columns, segments, BLOCK=BLOCK,
                                            SEGMENTS=max(triton.next_power_of_2(segments), 2), ACC=accumulate)
    _segment_dot_combine_kernel[(segments,)](partial, out, blocks, BLOCK=COMBINE_BLOCK)
    return out.to(x.dtype)
