"""Each op's phases on fixed random inputs, as callables run through autograd as the learner runs
them: ``forward`` (the values), ``backward`` (first derivatives) and ``double backward`` (second
derivatives along a random direction). The self-check compares a fused backend's outputs with the
torch backend's; the benchmarks and ``mamlfast check`` time them.

Inputs come from a seeded generator in a fixed order, so that the phases of one op built for two
backends see the same values. Each phase returns a tensor or a tuple of tensors (None where an
input does not enter that derivative).
"""

from __future__ import annotations

from typing import Callable

import torch

from .batch_norm import task_batch_norm
from .conv import grouped_conv2d
from .lslr import lslr_update, segment_ids_for
from .max_pool import max_pool2x2

Phases = dict[str, Callable[[], object]]
PHASES = ("forward", "backward", "double backward")


def random_tensors(device: torch.device, dtype: torch.dtype, rounded_to: torch.dtype | None = None):
    """A function of sizes giving Gaussian tensors of ``dtype`` on ``device``, the same sequence every
    call; with ``rounded_to``, values rounded to that dtype first (a float64 reference sees exactly
    the inputs of a lower-precision run)."""
    generator = torch.Generator().manual_seed(0)

    def tensor(*size: int) -> torch.Tensor:
        values = torch.randn(*size, generator=generator, dtype=torch.float64)
        return values.to(rounded_to or dtype).to(device, dtype)

    return tensor


def batch_norm_phases(backend: str, shape: tuple[int, ...], channels: int, device: torch.device,
                      dtype: torch.dtype = torch.float32, rounded_to: torch.dtype | None = None,
                      kernel_variant: str = "default") -> Phases:
    """Batch norm of x [N, B*C, H, W] = ``shape`` with weight and bias [``channels``], in the cuda and
    triton backends' ``kernel_variant``."""
    tensor = random_tensors(device, dtype, rounded_to)
    x, weight, bias = tensor(*shape).requires_grad_(), (tensor(channels) + 2).requires_grad_(), tensor(channels)
    bias.requires_grad_()
    upstream = tensor(*shape).requires_grad_()
    out = task_batch_norm(x, weight, bias, backend=backend, kernel_variant=kernel_variant)
    first = torch.autograd.grad(out, (x, weight, bias), upstream, create_graph=True)
    second_upstream = [tensor(*t.shape) for t in first]
    return {
        "forward": lambda: task_batch_norm(x, weight, bias, backend=backend, kernel_variant=kernel_variant),
        "backward": lambda: torch.autograd.grad(out, (x, weight, bias), upstream, retain_graph=True),
        "double backward": lambda: torch.autograd.grad(first, (x, weight, upstream), second_upstream,
                                                       retain_graph=True, allow_unused=True),
    }


def lslr_phases(backend: str, sizes: list[int], tasks: int, device: torch.device,
                dtype: torch.dtype = torch.float32, rounded_to: torch.dtype | None = None) -> Phases:
    """The LSLR update of [``tasks``, sum(``sizes``)] parameters, one rate per tensor of ``sizes``."""
    tensor = random_tensors(device, dtype, rounded_to)
    segments = segment_ids_for(sizes, device)
    params, grads = (tensor(tasks, sum(sizes)).requires_grad_() for _ in range(2))
    lrs = tensor(len(sizes)).abs().requires_grad_()
    out = lslr_update(params, grads, lrs, segments, backend=backend)
    upstream = tensor(*out.shape).requires_grad_()
    first = torch.autograd.grad(out, (params, grads, lrs), upstream, create_graph=True)
    second_upstream = [tensor(*t.shape) for t in first]
    return {
        "forward": lambda: lslr_update(params, grads, lrs, segments, backend=backend),
        "backward": lambda: torch.autograd.grad(out, (params, grads, lrs), upstream, retain_graph=True),
        # the update is linear in params: their second derivatives are zero
        "double backward": lambda: torch.autograd.grad(first, (grads, lrs, upstream), second_upstream,
                                                       retain_graph=True, allow_unused=True),
    }


def max_pool_phases(backend: str, shape: tuple[int, ...], device: torch.device,
                    dtype: torch.dtype = torch.float32, rounded_to: torch.dtype | None = None) -> Phases:
    """2x2 max pooling of x [N, C, H, W] = ``shape``."""
    tensor = random_tensors(device, dtype, rounded_to)
    x = tensor(*shape).requires_grad_()
    out = max_pool2x2(x, backend=backend)
    upstream = tensor(*out.shape).requires_grad_()
    (first,) = torch.autograd.grad(out, x, upstream, create_graph=True)
    second_upstream = tensor(*shape)
    return {
        "forward": lambda: max_pool2x2(x, backend=backend),
        "backward": lambda: torch.autograd.grad(out, x, upstream, retain_graph=True),
        "double backward": lambda: torch.autograd.grad(first, upstream, second_upstream, retain_graph=True),
    }


def conv_phases(backend: str, x_shape: tuple[int, ...], out_channels: int, groups: int, device: torch.device,
                dtype: torch.dtype = torch.float32, rounded_to: torch.dtype | None = None, *,
                input_needs_grad: bool = True) -> Phases:
    """The grouped 3x3 convolution (padding 1) of x [N, G*C_in, H, W] = ``x_shape`` into
    ``out_channels`` (G*C_out) channels; the images entering the backbone need no gradient."""
    tensor = random_tensors(device, dtype, rounded_to)
    in_channels = x_shape[1] // groups
    x = tensor(*x_shape)
    weight = tensor(out_channels, in_channels, 3, 3).requires_grad_()
    bias = tensor(out_channels).requires_grad_()
    inputs = (x.requires_grad_(), weight, bias) if input_needs_grad else (weight, bias)

    def forward():
        return grouped_conv2d(x, weight, bias, padding=1, groups=groups, backend=backend)

    out = forward()
    upstream = tensor(*out.shape).requires_grad_()
    first = torch.autograd.grad(out, inputs, upstream, create_graph=True)
    second_upstream = [tensor(*t.shape) for t in first]
    return {
        "forward": forward,
        "backward": lambda: torch.autograd.grad(out, inputs, upstream, retain_graph=True),
        # the output is linear in the bias: its second derivatives are zero
        "double backward": lambda: torch.autograd.grad(first, inputs[:-1] + (upstream,), second_upstream,
                                                       retain_graph=True, allow_unused=True),
    }
