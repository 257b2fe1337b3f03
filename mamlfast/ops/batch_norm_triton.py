"""Triton kernels of the per-step batch norm: forward, backward, and double backward.

Activations are [N, G*HW] in memory order [N, G, HW] with G = B*C groups (task, channel);
group g owns the N*HW values x[n, g, :], read in blocks of its flattened values e = n*HW + hw.
Sums accumulate in float32 (float64 for float64 inputs).

With per group mean mu, r = 1/sqrt(var + eps), xh = (x - mu) r, and means over a group
written <.>, the maths is:

    forward          y   = gamma xh + beta
    backward         dx  = gamma r (dy - <dy> - xh <dy xh>)
                     dgamma_g = sum(dy xh),  dbeta_g = sum(dy)
    double backward, for upstream gradients gdx (of dx), gdgamma and gdbeta (per channel):
                     g_dy = gamma r (gdx - <gdx> - xh <gdx xh>) + gdgamma xh + gdbeta
                     g_x  = gamma r^2 (-xh (<gdx dy> - <gdx><dy> - 3 <dy xh><gdx xh>)
                                       - <dy xh> (gdx - <gdx>) - <gdx xh> (dy - <dy>))
                            + gdgamma r (dy - <dy> - xh <dy xh>)
                     g_gamma_g = r M (<gdx dy> - <gdx><dy> - <gdx xh><dy xh>)

The per-group gamma gradients are summed over tasks by the caller. Every tensor comes contiguous
(batch_norm.py makes them so): the kernels index the activations, weight and bias as such.

Each kernel makes a few sums over a group, then applies them to each value. One program
handles one group (PASS "whole"), unless the groups are too few to occupy the GPU: then a
group is split into contiguous chunks, one program each, and two launches do the work: PASS
"sums" writes each program's partial sums, PASS "apply" adds the partial sums of its group in
a fixed order and applies them to its chunk. Nothing is added atomically, so results depend
on the shapes and the device only, never on the order in which programs run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_common import aligned, check_indexable

# Values per program and loop iteration, 4 per thread (a 16-byte vector of float32): 8 warps.
# Compiled for sm_90a, the looping kernels then need at most 48 registers in float32 and 80 in
# float64 (the single-pass forward, holding up to 4096 values, 64 and 94), and none spills;
# 2048 values in 4 warps needed up to 168 in float32 and spilled in float64.
MAX_BLOCK = 1024
VALUES_PER_THREAD = 4
SINGLE_PASS_LIMIT = 4096   # a group of at most this many values is read once, kept in registers
# groups are split while there are fewer programs than this per multiprocessor, per kernel variant
# (batch_norm.KERNEL_VARIANTS: "overlapped" has more programs in flight per multiprocessor),
PROGRAMS_PER_SM = {"default": 2, "overlapped": 8}
MIN_PROGRAM_VALUES = 8192  # into chunks of at least this many values


def programs_per_group(groups: int, values: int, device: torch.device, programs_per_sm: int) -> int:
    """Programs per group of ``values`` values: one while the ``groups`` alone give every
    multiprocessor ``programs_per_sm`` programs, else as many as do, each over at least
    MIN_PROGRAM_VALUES values."""
    target = programs_per_sm * _multiprocessors(device)
    if groups == 0 or groups >= target:
        return 1
    return max(1, min(triton.cdiv(target, groups), values // MIN_PROGRAM_VALUES))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's interpreter runs one program at a time
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _program_chunk(M, chunk, splits):
    """This program's group, and the range [begin, end) of the group's values it applies to."""
    program = tl.program_id(0)
    group = program // splits
    begin = (program % splits) * chunk
    return group, begin, tl.minimum(begin + chunk, M)


@triton.jit
def _group_offsets(group, start, end, groups, HW: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Memory offsets and mask of values start..start+BLOCK (up to end) of a group."""
    e = start + tl.arange(0, BLOCK)
    offsets = (e // HW) * (groups * HW) + group * HW + e % HW
    if VEC > 1:  # HW is a multiple of VEC: runs of VEC values lie side by side, aligned: vector loads
        offsets = tl.max_contiguous(tl.multiple_of(offsets, VEC), VEC)
    return offsets, e < end


@triton.jit
def _combined(PARTIAL, group, splits, k, SUMS: tl.constexpr, SPLITS: tl.constexpr):
    """Sum k of a split group: its programs' partial sums (PARTIAL [G, splits, SUMS]) added in a fixed order."""
    parts = tl.arange(0, SPLITS)
    return tl.sum(tl.load(PARTIAL + (group * splits + parts) * SUMS + k, mask=parts < splits, other=0.0), 0)


@triton.jit
def _mean(total, M, ACC: tl.constexpr):
    """total / M rounded to nearest, as the CUDA kernels divide (float32's `/` would compile to div.full.f32, an
    approximation)."""
    if ACC == tl.float32:
        return tl.div_rn(total, M.to(tl.float32))
    else:
        return total / M


@triton.jit
def _rstd(var, eps, ACC: tl.constexpr):
    """1/sqrt(var + eps) with the square root and the division rounded to nearest, as in the CUDA kernels
    (tl.sqrt would compile to sqrt.approx.ftz.f32); eps comes as float64 and is rounded to ACC, as there."""
    shifted = var + tl.full([], eps, ACC)
    if ACC == tl.float32:
        return tl.div_rn(1.0, tl.sqrt_rn(shifted))
    else:
        return 1.0 / tl.sqrt(shifted)


@triton.jit
def _forward_sums(X, group, begin, end, shift, groups,
                  HW: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    total = tl.zeros([BLOCK], ACC)
    squares = tl.zeros([BLOCK], ACC)
    for start in range(begin, end, BLOCK):
        offsets, mask = _group_offsets(group, start, end, groups, HW, BLOCK, VEC)
        x = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - shift, 0.0)
        total += x
        squares += x * x
    return tl.sum(total, 0), tl.sum(squares, 0)


@triton.jit
def _forward_kernel(X, Y, WEIGHT, BIAS, MEAN, VAR, RSTD, PARTIAL, groups, channels, M, chunk, splits, eps: tl.float64,
                    HW: tl.constexpr, BLOCK: tl.constexpr, PASS: tl.constexpr, SPLITS: tl.constexpr,
                    VEC: tl.constexpr, ACC: tl.constexpr):
    group, begin, end = _program_chunk(M, chunk, splits)
    weight = tl.load(WEIGHT + group % channels).to(ACC)
    bias = tl.load(BIAS + group % channels).to(ACC)
    if PASS == "single":  # the whole group fits in one block: read it once
        offsets, mask = _group_offsets(group, 0, M, groups, HW, BLOCK, VEC)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        mean = _mean(tl.sum(x, 0), M, ACC)
        centred = tl.where(mask, x - mean, 0.0)
        var = _mean(tl.sum(centred * centred, 0), M, ACC)
        rstd = _rstd(var, eps, ACC)
        tl.store(Y + offsets, (centred * rstd * weight + bias).to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + group, mean)
        tl.store(VAR + group, var)
        tl.store(RSTD + group, rstd)
    else:
        # sums of values shifted by the group's first value, which keeps float32 sums of squares exact enough
        shift = tl.load(X + group * HW).to(ACC)
        if PASS == "sums":
            total, squares = _forward_sums(X, group, begin, end, shift, groups, HW, BLOCK, VEC, ACC)
            partial = PARTIAL + tl.program_id(0) * 2
            tl.store(partial, total)
            tl.store(partial + 1, squares)
        else:
            if PASS == "apply":
                total = _combined(PARTIAL, group, splits, 0, 2, SPLITS)
                squares = _combined(PARTIAL, group, splits, 1, 2, SPLITS)
            else:
                total, squares = _forward_sums(X, group, 0, M, shift, groups, HW, BLOCK, VEC, ACC)
            shifted_mean = _mean(total, M, ACC)
            var = tl.maximum(_mean(squares, M, ACC) - shifted_mean * shifted_mean, 0.0)
            mean = shifted_mean + shift
            rstd = _rstd(var, eps, ACC)
            for start in range(begin, end, BLOCK):
                offsets, mask = _group_offsets(group, start, end, groups, HW, BLOCK, VEC)
                x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
                tl.store(Y + offsets, ((x - mean) * rstd * weight + bias).to(Y.dtype.element_ty), mask=mask)
            if begin == 0:
                tl.store(MEAN + group, mean)
                tl.store(VAR + group, var)
                tl.store(RSTD + group, rstd)


@triton.jit
def _backward_sums(DY, X, group, begin, end, mean, rstd, groups,
                   HW: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    sum_dy = tl.zeros([BLOCK], ACC)
    sum_dy_xh = tl.zeros([BLOCK], ACC)
    for start in range(begin, end, BLOCK):
        offsets, mask = _group_offsets(group, start, end, groups, HW, BLOCK, VEC)
        xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dy_xh += dy * xh  # dy is zero outside the group
    return tl.sum(sum_dy, 0), tl.sum(sum_dy_xh, 0)


@triton.jit
def _backward_kernel(DY, X, WEIGHT, MEAN, RSTD, DX, DWEIGHT, DBIAS, PARTIAL, groups, channels, M, chunk, splits,
                     HW: tl.constexpr, BLOCK: tl.constexpr, PASS: tl.constexpr, SPLITS: tl.constexpr,
                     VEC: tl.constexpr, ACC: tl.constexpr):
    group, begin, end = _program_chunk(M, chunk, splits)
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    if PASS == "sums":
        sum_dy, sum_dy_xh = _backward_sums(DY, X, group, begin, end, mean, rstd, groups, HW, BLOCK, VEC, ACC)
        partial = PARTIAL + tl.program_id(0) * 2
        tl.store(partial, sum_dy)
        tl.store(partial + 1, sum_dy_xh)
    else:
        if PASS == "apply":
            sum_dy = _combined(PARTIAL, group, splits, 0, 2, SPLITS)
            sum_dy_xh = _combined(PARTIAL, group, splits, 1, 2, SPLITS)
        else:
            sum_dy, sum_dy_xh = _backward_sums(DY, X, group, 0, M, mean, rstd, groups, HW, BLOCK, VEC, ACC)
        weight = tl.load(WEIGHT + group % channels).to(ACC)
        mean_dy = _mean(sum_dy, M, ACC)
        mean_dy_xh = _mean(sum_dy_xh, M, ACC)
        for start in range(begin, end, BLOCK):
            offsets, mask = _group_offsets(group, start, end, groups, HW, BLOCK, VEC)
            xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            dx = weight * rstd * (dy - mean_dy - xh * mean_dy_xh)
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        if begin == 0:
            tl.store(DWEIGHT + group, sum_dy_xh)
            tl.store(DBIAS + group, sum_dy)


@triton.jit
def _double_backward_sums(DY, X, GDX, group, begin, end, mean, rstd, groups,
                          HW: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    sum_dy = tl.zeros([BLOCK], ACC)
    sum_dy_xh = tl.zeros([BLOCK], ACC)
    sum_gdx = tl.zeros([BLOCK], ACC)
    sum_gdx_xh = tl.zeros([BLOCK], ACC)
    sum_gdx_dy = tl.zeros([BLOCK], ACC)
    for start in range(begin, end, BLOCK):
        offsets, mask = _group_offsets(group, start, end, groups, HW, BLOCK, VEC)
        xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)  # dy and gdx are zero outside the group
        gdx = tl.load(GDX + offsets, mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dy_xh += dy * xh
        sum_gdx += gdx
        sum_gdx_xh += gdx * xh
        sum_gdx_dy += gdx * dy
    return (tl.sum(sum_dy, 0), tl.sum(sum_dy_xh, 0), tl.sum(sum_gdx, 0), tl.sum(sum_gdx_xh, 0),
            tl.sum(sum_gdx_dy, 0))


@triton.jit
def _double_backward_kernel(DY, X, WEIGHT, MEAN, RSTD, GDX, GDWEIGHT, GDBIAS, G_DY, G_X, G_WEIGHT, PARTIAL,
                            groups, channels, M, chunk, splits,
                            HW: tl.constexpr, BLOCK: tl.constexpr, PASS: tl.constexpr, SPLITS: tl.constexpr,
                            VEC: tl.constexpr, ACC: tl.constexpr):
    group, begin, end = _program_chunk(M, chunk, splits)
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    if PASS == "sums":
        sum_dy, sum_dy_xh, sum_gdx, sum_gdx_xh, sum_gdx_dy = _double_backward_sums(
            DY, X, GDX, group, begin, end, mean, rstd, groups, HW, BLOCK, VEC, ACC)
        partial = PARTIAL + tl.program_id(0) * 5
        tl.store(partial, sum_dy)
        tl.store(partial + 1, sum_dy_xh)
        tl.store(partial + 2, sum_gdx)
        tl.store(partial + 3, sum_gdx_xh)
        tl.store(partial + 4, sum_gdx_dy)
    else:
        if PASS == "apply":
            sum_dy = _combined(PARTIAL, group, splits, 0, 5, SPLITS)
            sum_dy_xh = _combined(PARTIAL, group, splits, 1, 5, SPLITS)
            sum_gdx = _combined(PARTIAL, group, splits, 2, 5, SPLITS)
            sum_gdx_xh = _combined(PARTIAL, group, splits, 3, 5, SPLITS)
            sum_gdx_dy = _combined(PARTIAL, group, splits, 4, 5, SPLITS)
        else:
            sum_dy, sum_dy_xh, sum_gdx, sum_gdx_xh, sum_gdx_dy = _double_backward_sums(
                DY, X, GDX, group, 0, M, mean, rstd, groups, HW, BLOCK, VEC, ACC)
        weight = tl.load(WEIGHT + group % channels).to(ACC)
        gdweight = tl.load(GDWEIGHT + group % channels).to(ACC)
        gdbias = tl.load(GDBIAS + group % channels).to(ACC)
        mean_dy = _mean(sum_dy, M, ACC)
        mean_dy_xh = _mean(sum_dy_xh, M, ACC)
        mean_gdx = _mean(sum_gdx, M, ACC)
        mean_gdx_xh = _mean(sum_gdx_xh, M, ACC)
        covariance = _mean(sum_gdx_dy, M, ACC) - mean_gdx * mean_dy
        for start in range(begin, end, BLOCK):
            offsets, mask = _group_offsets(group, start, end, groups, HW, BLOCK, VEC)
            xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            gdx = tl.load(GDX + offsets, mask=mask, other=0.0).to(ACC)
            g_dy = weight * rstd * (gdx - mean_gdx - xh * mean_gdx_xh) + gdweight * xh + gdbias
            g_x = (weight * rstd * rstd * (-xh * (covariance - 3.0 * mean_dy_xh * mean_gdx_xh)
                                           - mean_dy_xh * (gdx - mean_gdx) - mean_gdx_xh * (dy - mean_dy))
                   + gdweight * rstd * (dy - mean_dy - xh * mean_dy_xh))
            tl.store(G_DY + offsets, g_dy.to(G_DY.dtype.element_ty), mask=mask)
            tl.store(G_X + offsets, g_x.to(G_X.dtype.element_ty), mask=mask)
        if begin == 0:
            tl.store(G_WEIGHT + group, rstd * M * (covariance - mean_gdx_xh * mean_dy_xh))


class _Launch:
    """How the kernels cover activations x [N, G, H, W]: programs per group, the chunk of values
    each applies to, the block, and the workspace of partial sums (``sums`` per program) of
    split groups."""

    def __init__(self, x: torch.Tensor, sums: int, variant: str):
        check_indexable(x, "batch-norm")
        self.groups, self.hw = x.shape[1], x.shape[2] * x.shape[3]
        self.values = x.shape[0] * self.hw
        self.empty = self.values == 0 or self.groups == 0
        self.block = min(MAX_BLOCK, max(triton.next_power_of_2(self.values), 16))
        splits = programs_per_group(self.groups, self.values, x.device, PROGRAMS_PER_SM[variant])
        # chunks are whole blocks; a group's last program takes what is left
        self.chunk = max(triton.cdiv(triton.cdiv(self.values, splits), self.block), 1) * self.block
        self.splits = max(triton.cdiv(self.values, self.chunk), 1)
        self.grid = (self.groups * self.splits,)
        self.passes = ("sums", "apply") if self.splits > 1 else ("whole",)
        self.partial = (torch.empty(self.groups * self.splits * sums, device=x.device, dtype=_stats_dtype(x))
                        if self.splits > 1 else None)
        vector = 16 // x.element_size()
        self.vec = vector if self.hw % vector == 0 else 1
        self.accumulate = tl.float64 if x.dtype == torch.float64 else tl.float32
        self.statistics_dtype = _stats_dtype(x)

    def sizes(self, channels: int) -> tuple:
        """The arguments every kernel takes after its tensors."""
        return self.partial, self.groups, channels, self.values, self.chunk, self.splits

    def options(self, name: str) -> dict:
        """The compile-time arguments and launch options of pass ``name``."""
        return dict(HW=self.hw, BLOCK=self.block, PASS=name, SPLITS=max(triton.next_power_of_2(self.splits), 2),
                    VEC=self.vec, ACC=self.accumulate,
                    num_warps=min(max(self.block // (32 * VALUES_PER_THREAD), 1), 8))


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward(x, weight, bias, eps, variant):
    """y, and per-group mean, biased variance and 1/sqrt(var + eps) [G] (NaN for groups of no values)."""
    x = aligned(x)
    launch = _Launch(x, sums=2, variant=variant)
    y = torch.empty_like(x)
    mean, var, rstd = (torch.empty(launch.groups, device=x.device, dtype=launch.statistics_dtype) for _ in range(3))
    if launch.empty:  # means of no values
        return y, mean.fill_(float("nan")), var.fill_(float("nan")), rstd.fill_(float("nan"))
    passes = launch.passes
    if launch.splits == 1 and triton.next_power_of_2(launch.values) <= SINGLE_PASS_LIMIT:
        launch.block, passes = max(triton.next_power_of_2(launch.values), 16), ("single",)
    for name in passes:
        _forward_kernel[launch.grid](x, y, weight, bias, mean, var, rstd, *launch.sizes(weight.shape[0]), eps,
                                     **launch.options(name))
    return y, mean, var, rstd


def backward(dy, x, weight, mean, rstd, variant):
    """dx, and per-group gradients of gamma and beta [G]."""
    dy, x = aligned(dy), aligned(x)
    launch = _Launch(x, sums=2, variant=variant)
    dx = torch.empty_like(x)
    dweight, dbias = (torch.empty(launch.groups, device=x.device, dtype=mean.dtype) for _ in range(2))
    if launch.empty:  # sums of no values
        return dx, dweight.zero_(), dbias.zero_()
    for name in launch.passes:
        _backward_kernel[launch.grid](dy, x, weight, mean, rstd, dx, dweight, dbias, *launch.sizes(weight.shape[0]),
                                      **launch.options(name))
    return dx, dweight, dbias


def double_backward(dy, x, weight, mean, rstd, gdx, gdweight, gdbias, variant):
    """Gradients with respect to dy and x, and per-group ones of gamma [G], of the backward."""
    dy, x, gdx = aligned(dy), aligned(x), aligned(gdx)
    launch = _Launch(x, sums=5, variant=variant)
    g_dy, g_x = torch.empty_like(x), torch.empty_like(x)
    g_weight = torch.empty(launch.groups, device=x.device, dtype=mean.dtype)
    if launch.empty:  # a sum of no values
        return g_dy, g_x, g_weight.zero_()
    for name in launch.passes:
        _double_backward_kernel[launch.grid](dy, x, weight, mean, rstd, gdx, gdweight, gdbias, g_dy, g_x, g_weight,
                                             *launch.sizes(weight.shape[0]), **launch.options(name))
    return g_dy, g_x, g_weight
