"""The backbone's convolution, ops.grouped_conv2d: every backend gives F.conv2d's values and
derivatives of the first three orders (the cpp backend's own second derivative included), for odd
sizes, without a bias, with inputs that need no gradient and with upstream gradients that are
missing; gradcheck and gradgradcheck in float64."""

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from conftest import device_of, usable
from mamlfast import ops
from mamlfast.ops.comparison import OP_TOLERANCES

# (N, groups, C_in, C_out, H, W, kernel, padding): like the backbone's first stage and a later one
# (a 3x3 kernel, padding 1), then odd sizes, no padding, a 1x1 kernel
SHAPES = [(5, 4, 1, 3, 6, 6, 3, 1), (3, 3, 2, 5, 5, 7, 3, 1), (1, 1, 3, 2, 4, 3, 3, 0), (2, 2, 1, 1, 1, 1, 3, 1),
          (4, 5, 2, 2, 3, 5, 1, 0)]


@pytest.fixture(params=["torch", "cpp", "triton", "cuda"])
def backend(request):
    return usable(request.param)


def _inputs(shape, dtype, device, *, bias=True, seed=0):
    n, groups, c_in, c_out, h, w, kernel, padding = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=g, dtype=dtype).to(device).requires_grad_()

    return (randn(n, groups * c_in, h, w), randn(groups * c_out, c_in, kernel, kernel),
            randn(groups * c_out) if bias else None, dict(padding=padding, groups=groups))


def _derivatives(conv, x, weight, bias, seed=1):
    """Output and derivatives of the first three orders along random directions, as second-order
    MAML takes them: the inner gradient of (x, weight, bias) with a graph, then the derivatives
    of a function of that gradient, then of a function of those."""
    g = torch.Generator().manual_seed(seed)
    leaves = [t for t in (x, weight, bias) if t is not None and t.requires_grad]

    def dot_random(tensors):
        return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum()
                   for t in tensors if t is not None)

    out = conv(x, weight, bias)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device).requires_grad_()
    first = torch.autograd.grad((out * upstream).sum(), leaves, create_graph=True)
    second = torch.autograd.grad(dot_random(first), leaves + [upstream], create_graph=True, allow_unused=True)
    differentiable = [t for t in second if t is not None and t.requires_grad]
    third = torch.autograd.grad(dot_random(differentiable), leaves + [upstream], allow_unused=True) \
        if differentiable else []
    return [out, *first, *second, *third]


def _assert_close(expected, actual, dtype):
    tolerance = asdict(OP_TOLERANCES[dtype])
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert (e is None) == (a is None)
        if e is not None:
            torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_three_orders_of_derivatives_match_conv2d(backend, shape, dtype):
    x, weight, bias, geometry = _inputs(shape, dtype, device_of(backend))
    expected = _derivatives(lambda *a: F.conv2d(*a, **geometry), x, weight, bias)
    actual = _derivatives(lambda *a: ops.grouped_conv2d(*a, **geometry, backend=backend), x, weight, bias)
    _assert_close(expected, actual, dtype)


@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_without_bias_and_with_input_that_needs_no_gradient(backend, x_needs_grad):
    """The backbone's first stage: its input, the images, needs no gradient."""
    x, weight, _, geometry = _inputs(SHAPES[1], torch.float64, device_of(backend), bias=False)
    x.requires_grad_(x_needs_grad)
    expected = _derivatives(lambda *a: F.conv2d(*a, **geometry), x, weight, None)
    actual = _derivatives(lambda *a: ops.grouped_conv2d(*a, **geometry, backend=backend), x, weight, None)
    _assert_close(expected, actual, torch.float64)


@pytest.mark.parametrize("used", ["x", "weight", "bias"])
def test_second_derivative_when_only_one_first_derivative_is_used(backend, used):
    """Upstream gradients of the unused first derivatives reach the second derivative as None."""
    x, weight, bias, geometry = _inputs(SHAPES[1], torch.float64, device_of(backend))

    def second(conv):
        out = conv(x, weight, bias)
        first = dict(zip(("x", "weight", "bias"), torch.autograd.grad(out.pow(2).sum(), (x, weight, bias),
                                                                      create_graph=True)))
        return torch.autograd.grad(first[used].pow(2).sum(), (x, weight, bias), allow_unused=True)

    expected = second(lambda *a: F.conv2d(*a, **geometry))
    actual = second(lambda *a: ops.grouped_conv2d(*a, **geometry, backend=backend))
    _assert_close(expected, actual, torch.float64)


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_gradcheck_and_gradgradcheck(backend, shape):
    x, weight, bias, geometry = _inputs(shape, torch.float64, device_of(backend))

    def conv(*args):
        return ops.grouped_conv2d(*args, **geometry, backend=backend)

    def inner_gradient(*args):
        return torch.autograd.grad(conv(*args).pow(2).sum(), args, create_graph=True)

    assert gradcheck(conv, (x, weight, bias))
    assert gradgradcheck(conv, (x, weight, bias))
    assert gradgradcheck(inner_gradient, (x, weight, bias))


def test_cpp_states_its_own_second_derivative():
    """Only the cpp backend replaces PyTorch's double backward; the others are F.conv2d itself."""
    reason = ops.availability(torch.device("cpu"))["cpp"]
    if reason:
        pytest.skip(reason)
    x, weight, bias, geometry = _inputs(SHAPES[0], torch.float32, "cpu")
    assert type(ops.grouped_conv2d(x, weight, bias, **geometry, backend="cpp").grad_fn).__name__ == "_Conv2dBackward"
    assert type(ops.grouped_conv2d(x, weight, bias, **geometry, backend="torch").grad_fn).__name__ == \
        type(F.conv2d(x, weight, bias, **geometry).grad_fn).__name__
