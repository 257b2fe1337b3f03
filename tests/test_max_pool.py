"""The backbone's max pooling, ops.max_pool2x2: every backend gives F.max_pool2d(x, 2)'s values
and derivatives of the first three orders bit for bit, ties, NaNs and odd sizes included; the
CPU kernels of the cpp backend pass gradcheck, gradgradcheck and opcheck, and refuse bad
arguments in one line."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from conftest import device_of, usable
from mamlfast import ops


@pytest.fixture(params=["torch", "cpp", "triton", "cuda"])
def backend(request):
    return usable(request.param)


@pytest.fixture
def cpu_kernels():
    reason = ops.availability(torch.device("cpu"))["cpp"]
    if reason:
        pytest.skip(reason)


def _images(shape, dtype, device, seed=0):
    """Gaussian values with the cases that decide which value of a window is its maximum: a plane
    of equal values (as binary images give), equal pairs, NaNs and infinities."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x[0, 0] = 0.5
    pairs = x.shape[3] // 2
    x[-1, -1, :, 1::2] = x[-1, -1, :, 0:2 * pairs:2]
    x[0, -1, 0, :2] = float("nan")
    x[0, -1, 1, 1] = float("nan")
    x[-1, 0, 0, :2] = float("-inf")
    x[-1, 0, 1, :2] = float("inf")
    return x.to(device)


def _derivatives(pool, x, seed=1):
    """Output, and derivatives of the first three orders along random directions (a third of
    their values -0), of ``pool``."""
    g = torch.Generator().manual_seed(seed)

    def like(t):
        values = torch.randn(t.shape, generator=g, dtype=t.dtype)
        values.view(-1)[::3] = -0.0
        return values.to(t.device).requires_grad_()

    x = x.detach().requires_grad_()
    out = pool(x)
    upstream = like(out)
    (first,) = torch.autograd.grad(out, x, upstream, create_graph=True)
    direction = like(first)
    (second,) = torch.autograd.grad(first, upstream, direction, create_graph=True)
    (third,) = torch.autograd.grad(second, direction, like(second))
    return out, first, second, third


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (2, 3, 6, 6), (1, 2, 2, 3), (4, 5, 11, 2), (2, 3, 28, 28)], ids=str)
def test_pooling_is_torchs_bit_for_bit(backend, shape, dtype):
    x = _images(shape, dtype, device_of(backend))
    expected = _derivatives(lambda t: F.max_pool2d(t, 2), x)
    actual = _derivatives(lambda t: ops.max_pool2x2(t, backend=backend), x)
    for name, e, a in zip(("values", "first", "second", "third"), expected, actual):
        assert torch.equal(e.nan_to_num(7.0), a.nan_to_num(7.0)) and torch.equal(e.isnan(), a.isnan()), name
        assert torch.equal(e.signbit(), a.signbit()), f"{name}: the signs of zeros differ"


def test_pooling_takes_strided_input(cpu_kernels):
    x = torch.randn(3, 4, 9, 8).transpose(2, 3)
    assert torch.equal(ops.max_pool2x2(x, backend="cpp"), F.max_pool2d(x, 2))


def test_cpu_kernels_pass_gradcheck_and_gradgradcheck(cpu_kernels):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: ops.max_pool2x2(t, backend="cpp"), (x,))
    assert gradgradcheck(lambda t: ops.max_pool2x2(t, backend="cpp"), (x,))


def test_operators_pass_opcheck(cpu_kernels):
    x = torch.randn(2, 3, 5, 7)
    out, argmax = torch.ops.mamlfast.max_pool2x2_forward(x)
    samples = {
        "max_pool2x2_forward": (x,),
        "max_pool2x2_backward": (torch.randn_like(out), argmax, 5, 7),
        "max_pool2x2_double_backward": (torch.randn_like(x), argmax),
    }
    for name, args in samples.items():
        torch.library.opcheck(getattr(torch.ops.mamlfast, name).default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_every_backend_refuses_what_it_cannot_pool(backend):
    for x in (torch.randn(3, 4, 4), torch.randn(1, 2, 1, 4), torch.ones(1, 2, 4, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"max_pool2x2 expects a floating-point x of shape \[N, C, H, W\]"):
            ops.max_pool2x2(x.to(device_of(backend)), backend=backend)


def _operator_cases():
    x = torch.randn(2, 3, 5, 7)
    grad, argmax = torch.randn(2, 3, 2, 3), torch.zeros(2, 3, 2, 3, dtype=torch.uint8)
    forward, backward, double = "max_pool2x2_forward", "max_pool2x2_backward", "max_pool2x2_double_backward"
    return [
        (forward, (x[0],), r"x must be \[N, C, H, W\]"),
        (forward, (x[..., :1].contiguous(),), "x must be at least 2x2"),
        (forward, (x.int(),), "x must be float32, float64, float16 or bfloat16"),
        (forward, (x.half(),), "on the CPU, x must be float32 or float64, got Half"),
        (forward, (x.transpose(2, 3),), "x must be contiguous"),
        (backward, (grad, argmax, 6, 7), "an input of height 6 and width 7 does not pool to"),
        (backward, (grad, argmax[:1], 5, 7), r"argmax must be \[N, C, H / 2, W / 2\] = \[2, 3, 2, 3\]"),
        (backward, (grad, argmax.long(), 5, 7), "argmax must be uint8, got Long"),
        (double, (x, argmax[..., :2]), r"argmax must be \[N, C, H / 2, W / 2\] = \[2, 3, 2, 3\], got \[2, 3, 2, 2\]"),
        (double, (x[:, :, :1].contiguous(), argmax), r"gg_x must be \[N, C, H, W\] with H, W >= 2"),
    ]


def test_operators_refuse_argmax_codes_out_of_range(cpu_kernels):
    x = torch.randn(2, 3, 4, 4)
    _, argmax = torch.ops.mamlfast.max_pool2x2_forward(x)
    argmax[1, 2, 1, 0] = 4
    with pytest.raises(ValueError, match=r"argmax codes must lie in \[0, 4\), got 4"):
        torch.ops.mamlfast.max_pool2x2_backward(torch.ones(2, 3, 2, 2), argmax, 4, 4)
    with pytest.raises(ValueError, match=r"argmax codes must lie in \[0, 4\), got 4"):
        torch.ops.mamlfast.max_pool2x2_double_backward(x, argmax)


@pytest.mark.parametrize("op, args, message", _operator_cases(), ids=lambda case: case if isinstance(case, str) else "")
def test_operators_refuse(cpu_kernels, op, args, message):
    with pytest.raises(ValueError, match=message) as error:
        getattr(torch.ops.mamlfast, op)(*args)
    assert "\n" not in str(error.value).strip(), str(error.value)
