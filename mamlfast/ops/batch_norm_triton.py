"""Triton kernels of the per-step batch norm: forward, backward, and double backward.

Activations are [N, G*HW] in memory order [N, G, HW] with G = B*C groups (task, channel);
group g owns the N*HW values x[n, g, :]. One program handles one group, in blocks of its
flattened values e = n*HW + hw. Sums accumulate in float32 (float64 for float64 inputs).

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

The per-group gamma gradients are summed over tasks by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 2048
SINGLE_PASS_LIMIT = 4096


@triton.jit
def _group_offsets(group, start, groups, HW: tl.constexpr, M, BLOCK: tl.constexpr):
    """Memory offsets and mask of values start..start+BLOCK of a group."""
    e = start + tl.arange(0, BLOCK)
    return (e // HW) * (groups * HW) + group * HW + e % HW, e < M


@triton.jit
def _forward_kernel(X, Y, WEIGHT, BIAS, MEAN, VAR, RSTD, groups, channels, M, eps,
                    HW: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr, ACC: tl.constexpr):
    group = tl.program_id(0)
    weight = tl.load(WEIGHT + group % channels).to(ACC)
    bias = tl.load(BIAS + group % channels).to(ACC)
    if SINGLE_PASS:  # the whole group fits in one block: read it once
        offsets, mask = _group_offsets(group, 0, groups, HW, M, BLOCK)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, 0) / M
        centred = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centred * centred, 0) / M
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(Y + offsets, (centred * rstd * weight + bias).to(Y.dtype.element_ty), mask=mask)
    else:
        # sums of values shifted by the group's first value, which keeps float32 sums of squares exact enough
        shift = tl.load(X + group * HW).to(ACC)
        total = tl.zeros([BLOCK], ACC)
        squares = tl.zeros([BLOCK], ACC)
        for start in range(0, M, BLOCK):
            offsets, mask = _group_offsets(group, start, groups, HW, M, BLOCK)
            x = tl.where(mask, tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - shift, 0.0)
            total += x
            squares += x * x
        shifted_mean = tl.sum(total, 0) / M
        var = tl.maximum(tl.sum(squares, 0) / M - shifted_mean * shifted_mean, 0.0)
        mean = shifted_mean + shift
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, M, BLOCK):
            offsets, mask = _group_offsets(group, start, groups, HW, M, BLOCK)
            x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
            tl.store(Y + offsets, ((x - mean) * rstd * weight + bias).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + group, mean)
    tl.store(VAR + group, var)
    tl.store(RSTD + group, rstd)


@triton.jit
def _backward_kernel(DY, X, WEIGHT, MEAN, RSTD, DX, DWEIGHT, DBIAS, groups, channels, M,
                     HW: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    group = tl.program_id(0)
    weight = tl.load(WEIGHT + group % channels).to(ACC)
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    sum_dy = tl.zeros([BLOCK], ACC)
    sum_dy_xh = tl.zeros([BLOCK], ACC)
    for start in range(0, M, BLOCK):
        offsets, mask = _group_offsets(group, start, groups, HW, M, BLOCK)
        xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dy_xh += dy * xh  # dy is zero outside the group
    mean_dy = tl.sum(sum_dy, 0) / M
    mean_dy_xh = tl.sum(sum_dy_xh, 0) / M
    for start in range(0, M, BLOCK):
        offsets, mask = _group_offsets(group, start, groups, HW, M, BLOCK)
        xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        dx = weight * rstd * (dy - mean_dy - xh * mean_dy_xh)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DWEIGHT + group, mean_dy_xh * M)
    tl.store(DBIAS + group, mean_dy * M)


@triton.jit
def _double_backward_kernel(DY, X, WEIGHT, MEAN, RSTD, GDX, GDWEIGHT, GDBIAS, G_DY, G_X, G_WEIGHT,
                            groups, channels, M, HW: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    group = tl.program_id(0)
    weight = tl.load(WEIGHT + group % channels).to(ACC)
    gdweight = tl.load(GDWEIGHT + group % channels).to(ACC)
    gdbias = tl.load(GDBIAS + group % channels).to(ACC)
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    sum_dy = tl.zeros([BLOCK], ACC)
    sum_dy_xh = tl.zeros([BLOCK], ACC)
    sum_gdx = tl.zeros([BLOCK], ACC)
    sum_gdx_xh = tl.zeros([BLOCK], ACC)
    sum_gdx_dy = tl.zeros([BLOCK], ACC)
    for start in range(0, M, BLOCK):
        offsets, mask = _group_offsets(group, start, groups, HW, M, BLOCK)
        xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)  # dy and gdx are zero outside the group
        gdx = tl.load(GDX + offsets, mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dy_xh += dy * xh
        sum_gdx += gdx
        sum_gdx_xh += gdx * xh
        sum_gdx_dy += gdx * dy
    mean_dy = tl.sum(sum_dy, 0) / M
    mean_dy_xh = tl.sum(sum_dy_xh, 0) / M
    mean_gdx = tl.sum(sum_gdx, 0) / M
    mean_gdx_xh = tl.sum(sum_gdx_xh, 0) / M
    covariance = tl.sum(sum_gdx_dy, 0) / M - mean_gdx * mean_dy
    for start in range(0, M, BLOCK):
        offsets, mask = _group_offsets(group, start, groups, HW, M, BLOCK)
        xh = (tl.load(X + offsets, mask=mask, other=0.0).to(ACC) - mean) * rstd
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
        gdx = tl.load(GDX + offsets, mask=mask, other=0.0).to(ACC)
        g_dy = weight * rstd * (gdx - mean_gdx - xh * mean_gdx_xh) + gdweight * xh + gdbias
        g_x = (weight * rstd * rstd * (-xh * (covariance - 3.0 * mean_dy_xh * mean_gdx_xh)
                                       - mean_dy_xh * (gdx - mean_gdx) - mean_gdx_xh * (dy - mean_dy))
               + gdweight * rstd * (dy - mean_dy - xh * mean_dy_xh))
        tl.store(G_DY + offsets, g_dy.to(G_DY.dtype.element_ty), mask=mask)
        tl.store(G_X + offsets, g_x.to(G_X.dtype.element_ty), mask=mask)
    tl.store(G_WEIGHT + group, rstd * M * (covariance - mean_gdx_xh * mean_dy_xh))


def _launch_shape(x: torch.Tensor):
    """(groups, values per group, HW, block, accumulator dtype) of activations x [N, G, H, W]."""
    groups, hw = x.shape[1], x.shape[2] * x.shape[3]
    values = x.shape[0] * hw
    block = min(MAX_BLOCK, max(triton.next_power_of_2(values), 128))
    accumulate = tl.float64 if x.dtype == torch.float64 else tl.float32
    return groups, values, hw, block, accumulate


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward(x, weight, bias, eps):
    """y, and per-group mean, biased variance and 1/sqrt(var + eps) [G]."""
    groups, values, hw, block, accumulate = _launch_shape(x)
    single = triton.next_power_of_2(values) <= SINGLE_PASS_LIMIT
    if single:
        block = max(triton.next_power_of_2(values), 16)
    y = torch.empty_like(x)
    mean, var, rstd = (torch.empty(groups, device=x.device, dtype=_stats_dtype(x)) for _ in range(3))
    _forward_kernel[(groups,)](x, y, weight, bias, mean, var, rstd, groups, weight.shape[0], values, eps,
                               HW=hw, BLOCK=block, SINGLE_PASS=single, ACC=accumulate)
    return y, mean, var, rstd


def backward(dy, x, weight, mean, rstd):
    """dx, and per-group gradients of gamma and beta [G]."""
    groups, values, hw, block, accumulate = _launch_shape(x)
    dx = torch.empty_like(x)
    dweight, dbias = (torch.empty(groups, device=x.device, dtype=mean.dtype) for _ in range(2))
    _backward_kernel[(groups,)](dy, x, weight, mean, rstd, dx, dweight, dbias, groups, weight.shape[0], values,
                                HW=hw, BLOCK=block, ACC=accumulate)
    return dx, dweight, dbias


def double_backward(dy, x, weight, mean, rstd, gdx, gdweight, gdbias):
    """Gradients with respect to dy and x, and per-group ones of gamma [G], of the backward."""
    groups, values, hw, block, accumulate = _launch_shape(x)
    g_dy, g_x = torch.empty_like(x), torch.empty_like(x)
    g_weight = torch.empty(groups, device=x.device, dtype=mean.dtype)
    _double_backward_kernel[(groups,)](dy, x, weight, mean, rstd, gdx, gdweight, gdbias, g_dy, g_x, g_weight,
                                       groups, weight.shape[0], values, HW=hw, BLOCK=block, ACC=accumulate)
    return g_dy, g_x, g_weight
