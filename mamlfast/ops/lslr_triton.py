"""Triton kernels of the LSLR update over the flat [B, P] buffer of adapted parameters.

Two kernels make the update and all its derivatives, of any order (see ``lslr.py``):

    segment_axpy   out[b, p] = base[b, p] + s[segment[p]] * x[b, p]
    segment_dot    out[t]    = sum over b and the columns p of segment t of x[b, p] * y[b, p]

Segments are contiguous column ranges, so most blocks of columns lie in one segment and add
their sum with one atomic; a block that straddles segments adds column by column. Atomic
float additions make ``segment_dot`` reproducible only up to the order of its additions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _segment_axpy_kernel(X, S, SEGMENT, BASE, OUT, P, BLOCK: tl.constexpr, HAS_BASE: tl.constexpr):
    row = tl.program_id(1)
    columns = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < P
    scale = tl.load(S + tl.load(SEGMENT + columns, mask=mask, other=0), mask=mask, other=0.0)
    x = tl.load(X + row * P + columns, mask=mask, other=0.0)
    out = scale * x
    if HAS_BASE:
        out += tl.load(BASE + row * P + columns, mask=mask, other=0.0)
    tl.store(OUT + row * P + columns, out, mask=mask)


@triton.jit
def _segment_dot_kernel(X, Y, SEGMENT, OUT, rows, P, BLOCK: tl.constexpr, ACC: tl.constexpr):
    columns = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < P
    segment = tl.load(SEGMENT + columns, mask=mask, other=0)
    total = tl.zeros([BLOCK], ACC)
    for row in range(0, rows):
        x = tl.load(X + row * P + columns, mask=mask, other=0.0).to(ACC)
        y = tl.load(Y + row * P + columns, mask=mask, other=0.0).to(ACC)
        total += x * y
    first = tl.min(tl.where(mask, segment, 2**30), 0)
    last = tl.max(tl.where(mask, segment, -1), 0)
    if first == last:
        tl.atomic_add(OUT + first, tl.sum(total, 0))
    else:
        tl.atomic_add(OUT + segment, total, mask=mask)


def segment_axpy(x: torch.Tensor, s: torch.Tensor, segment: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    rows, columns = x.shape
    out = torch.empty_like(x)
    grid = (triton.cdiv(columns, BLOCK), rows)
    _segment_axpy_kernel[grid](x, s.to(x.dtype), segment, x if base is None else base, out, columns,
                               BLOCK=BLOCK, HAS_BASE=base is not None)
    return out


def segment_dot(x: torch.Tensor, y: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    rows, columns = x.shape
    accumulate = tl.float64 if x.dtype == torch.float64 else tl.float32
    out = torch.zeros(segments, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    _segment_dot_kernel[(triton.cdiv(columns, BLOCK),)](x, y, segment, out, rows, columns, BLOCK=BLOCK, ACC=accumulate)
    return out.to(x.dtype)
