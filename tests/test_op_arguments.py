"""Calls the hot ops cannot take fail before any kernel runs, with a ValueError naming the
argument: at the Python entry points for every backend, and in the compiled operators
torch.ops.mamlfast.* (csrc/op_checks.h), whose checks are the same for the CPU and the CUDA
kernels (run here on the test device)."""

import subprocess
import sys

import pytest
import torch

from conftest import DEVICE
from mamlfast import ops
from mamlfast.ops import batch_norm_triton, lslr_triton
from mamlfast.ops.extension import load_error

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
other_device = pytest.mark.skipif(DEVICE != "cuda", reason="needs a second device: a CUDA one")


def _batch_norm_inputs(samples=2, tasks=2, channels=3, side=3, dtype=torch.float32, device="cpu"):
    x = torch.randn(samples, tasks * channels, side, side, dtype=dtype, device=device)
    return x, torch.ones(channels, dtype=dtype, device=device), torch.zeros(channels, dtype=dtype, device=device)


@pytest.mark.parametrize("change, message", [
    (lambda x, w, b: (x, w[:0], b[:0]), r"\[C\] with C >= 1"),
    (lambda x, w, b: (x[:, :0], w, b), "needs at least one task"),
    (lambda x, w, b: (x.int(), w, b), "x must be a floating-point tensor"),
    (lambda x, w, b: (x, w.long(), b), "weight must be a floating-point tensor"),
    (lambda x, w, b: (x, w, b.to("meta")), "bias must be a floating-point tensor on x's device cpu"),
])
def test_task_batch_norm_refuses(change, message):
    with pytest.raises(ValueError, match=message):
        ops.task_batch_norm(*change(*_batch_norm_inputs()), backend="torch")


def test_task_batch_norm_refuses_an_unknown_kernel_variant():
    with pytest.raises(ValueError, match="kernel_variant must be one of default, overlapped, got 'fast'"):
        ops.task_batch_norm(*_batch_norm_inputs(), kernel_variant="fast", backend="torch")


def _lslr_inputs(rows=2, sizes=(2, 3), dtype=torch.float32):
    columns = sum(sizes)
    return (torch.randn(rows, columns, dtype=dtype), torch.randn(rows, columns, dtype=dtype),
            torch.rand(len(sizes), dtype=dtype), ops.segment_ids_for(list(sizes)))


@pytest.mark.parametrize("change, message", [
    (lambda p, g, lr, ids: (p, g.double(), lr, ids), "grads must have params' dtype torch.float32"),
    (lambda p, g, lr, ids: (p, g, lr.double(), ids), "lrs must have params' dtype"),
    (lambda p, g, lr, ids: (p, g, lr[:0], ids), r"lrs must be \[T\], one rate per segment id"),
    (lambda p, g, lr, ids: (p.long(), g.long(), lr.long(), ids), "params must be a floating-point tensor"),
    (lambda p, g, lr, ids: (p, g, lr, ids.float()), "segment_ids must be an int32 or int64 tensor"),
    (lambda p, g, lr, ids: (p, g, lr, ids.to("meta")), r"segment_ids .* on cpu, got .* on meta"),
])
def test_lslr_update_refuses(change, message):
    with pytest.raises(ValueError, match=message):
        ops.lslr_update(*change(*_lslr_inputs()), backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lslr_update_takes_int32_and_int64_segment_ids_alike(backend):
    reason = ops.availability(torch.device(DEVICE))[backend]
    if reason:
        pytest.skip(reason)
    params, grads, lrs, ids = (t.to(DEVICE) for t in _lslr_inputs())
    torch.testing.assert_close(ops.lslr_update(params, grads, lrs, ids.int(), backend=backend),
                               ops.lslr_update(params, grads, lrs, ids, backend=backend), rtol=0, atol=0)


def test_triton_kernels_refuse_what_int32_offsets_cannot_index():
    huge = torch.empty(1, 1, 1, 1).expand(2**16, 2**15, 1, 1)  # 2**31 values, no memory
    with pytest.raises(ValueError, match="index in int32"):
        batch_norm_triton.forward(huge, torch.ones(1), torch.zeros(1), 1e-5, "default")
    flat = torch.empty(1, 1).expand(2**16, 2**15)
    with pytest.raises(ValueError, match="index in int32"):
        lslr_triton.segment_dot(flat, flat, torch.zeros(2**15, dtype=torch.long), 1)


# The compiled operators. Each case: the operator, a function of valid inputs on a device making
# one bad argument, the error expected, and any marks.
def _compiled_cases():
    def bn(**changes):
        def make(device):
            x, weight, bias = _batch_norm_inputs(device=device)
            _, mean, _, rstd = torch.ops.mamlfast.batch_norm_forward(x, weight, bias, 1e-5)
            args = dict(grad_out=torch.randn_like(x), x=x, weight=weight, bias=bias, mean=mean, rstd=rstd,
                        gg_x=torch.randn_like(x), gg_weight=torch.randn_like(weight),
                        gg_bias=torch.randn_like(bias), eps=1e-5, variant=0)
            args.update({name: change(args) for name, change in changes.items()})
            return args
        make.argument = ",".join(changes)
        return make

    forward = ("batch_norm_forward", ["x", "weight", "bias", "eps"])
    backward = ("batch_norm_backward", ["grad_out", "x", "weight", "mean", "rstd"])
    double = ("batch_norm_double_backward", ["grad_out", "x", "weight", "mean", "rstd", "gg_x", "gg_weight",
                                             "gg_bias"])
    return [
        (forward, bn(x=lambda a: a["x"].int()), "x must be float32, float64, float16 or bfloat16, got Int"),
        (forward, bn(x=lambda a: a["x"][0]), r"x must be \[N, B\*C, H, W\]"),
        (forward, bn(x=lambda a: a["x"].transpose(2, 3)), "x must be contiguous"),
        (forward, bn(weight=lambda a: a["weight"][:0]), r"weight must be \[C\] with C >= 1"),
        (forward, bn(weight=lambda a: a["weight"].new_ones(4)), "x.size.1. = 6 is not a multiple of C = 4"),
        (forward, bn(weight=lambda a: a["weight"].double()), "weight must be Float, got Double"),
        (forward, bn(bias=lambda a: a["bias"][:2]), r"bias must be \[3\], got \[2\]"),
        (forward, bn(bias=lambda a: a["bias"].cpu()), "bias must be on cuda:0 like x, got cpu", other_device),
        (forward, bn(eps=lambda a: -1.0), "eps must be >= 0"),
        ((forward[0], forward[1] + ["variant"]), bn(variant=lambda a: 2),
         r"variant must be 0 \(default\) or 1 \(overlapped\), got 2"),
        ((double[0], double[1] + ["variant"]), bn(variant=lambda a: -1), "variant must be 0"),
        (backward, bn(grad_out=lambda a: a["grad_out"][:1]), "grad_out must have x's shape"),
        (backward, bn(grad_out=lambda a: a["grad_out"].half()), "grad_out must have x's dtype Float, got Half"),
        (backward, bn(mean=lambda a: a["mean"].double()), "mean must be Float, got Double"),
        (backward, bn(rstd=lambda a: a["rstd"][:5]), r"rstd must be \[6\], got \[5\]"),
        (double, bn(gg_x=lambda a: a["gg_x"].transpose(2, 3)), "gg_x must be contiguous"),
        (double, bn(gg_x=lambda a: a["gg_x"][:, :3]), "gg_x must have x's shape"),
        (double, bn(gg_weight=lambda a: a["gg_weight"][:2]), r"gg_weight must be \[3\]"),
        (double, bn(gg_bias=lambda a: a["gg_bias"].double()), "gg_bias must be Float, got Double"),
    ] + _segment_cases()


def _segment_cases():
    def seg(**changes):
        def make(device):
            x = torch.randn(2, 5, device=device)
            args = dict(x=x, y=torch.randn_like(x), s=torch.rand(2, device=device), base=torch.randn_like(x),
                        segment=ops.segment_ids_for([2, 3], device), segments=2)
            args.update({name: change(args) for name, change in changes.items()})
            return args
        make.argument = ",".join(changes)
        return make

    axpy = ("segment_axpy", ["x", "s", "segment", "base"])
    dot = ("segment_dot", ["x", "y", "segment", "segments"])
    return [
        (axpy, seg(x=lambda a: a["x"][0]), r"x must be \[B, P\]"),
        (axpy, seg(x=lambda a: a["x"].long()), "x must be float32, float64, float16 or bfloat16"),
        (axpy, seg(segment=lambda a: a["segment"].float()), "segment must be int32 or int64, got Float"),
        (axpy, seg(segment=lambda a: a["segment"][:4]), r"segment must be \[P\] = \[5\], got \[4\]"),
        (axpy, seg(segment=lambda a: a["segment"].cpu()), "segment must be on cuda:0 like x", other_device),
        (axpy, seg(s=lambda a: a["s"][:0]), r"s must be \[T\], one value per segment id"),
        (axpy, seg(s=lambda a: a["s"].double()), "s must be Float, got Double"),
        (axpy, seg(base=lambda a: a["base"].t().contiguous()), "base must have x's shape"),
        (dot, seg(y=lambda a: a["y"][:1]), "y must have x's shape"),
        (dot, seg(y=lambda a: a["y"].double()), "y must have x's dtype"),
        (dot, seg(segments=lambda a: 0), "segments must be >= 1"),
    ]


@pytest.mark.parametrize("op, make, message",
                         [pytest.param(op, make, message, id=f"{op[0]}-{make.argument}", marks=marks)
                          for op, make, message, *marks in _compiled_cases()])
def test_compiled_operators_refuse(op, make, message):
    if load_error():
        pytest.skip(load_error())
    (name, parameters), args = op, make(DEVICE)
    with pytest.raises(ValueError, match=message) as error:
        getattr(torch.ops.mamlfast, name)(*(args[p] for p in parameters))
    assert "\n" not in str(error.value).strip(), str(error.value)


def test_compiled_operators_take_zero_sizes_and_int32_segment_ids():
    if load_error():
        pytest.skip(load_error())
    mamlfast = torch.ops.mamlfast
    for shape in [(0, 6, 3, 3), (2, 6, 0, 3), (2, 0, 3, 3)]:  # no samples, no pixels, no groups
        x, weight, bias = _batch_norm_inputs(samples=shape[0], tasks=shape[1] // 3, side=3, device=DEVICE)
        x = x.new_zeros(shape)
        y, mean, var, rstd = mamlfast.batch_norm_forward(x, weight, bias, 1e-5)
        assert y.shape == shape and mean.shape == (shape[1],) and (mean.isnan().all() or shape[1] == 0)
        grad_x, grad_weight, grad_bias = mamlfast.batch_norm_backward(x, x, weight, mean, rstd)
        assert grad_x.shape == shape and grad_weight.eq(0).all() and grad_bias.eq(0).all()
        g_dy, g_x, g_weight = mamlfast.batch_norm_double_backward(x, x, weight, mean, rstd, x, weight, bias)
        assert g_dy.shape == g_x.shape == shape and g_weight.eq(0).all()
    for rows, columns in [(0, 5), (2, 0)]:
        x = torch.zeros(rows, columns, device=DEVICE)
        segment = torch.zeros(columns, dtype=torch.long, device=DEVICE)
        assert mamlfast.segment_axpy(x, torch.ones(1, device=DEVICE), segment, None).shape == (rows, columns)
        assert mamlfast.segment_dot(x, x, segment, 3).tolist() == [0, 0, 0]
    x, y = torch.randn(3, 7, device=DEVICE), torch.randn(3, 7, device=DEVICE)
    segment, s = torch.tensor([1, 0, 2, 0, 1, 2, 2], device=DEVICE), torch.rand(3, device=DEVICE)
    assert torch.equal(mamlfast.segment_dot(x, y, segment.int(), 3), mamlfast.segment_dot(x, y, segment, 3))
    assert torch.equal(mamlfast.segment_axpy(x, s, segment.int(), y), mamlfast.segment_axpy(x, s, segment, y))


def test_cpu_kernels_refuse_half_precision_and_out_of_range_segment_ids():
    if load_error():
        pytest.skip(load_error())
    x, weight = torch.randn(2, 4, 3, 3).half(), torch.ones(2).half()
    with pytest.raises(ValueError, match="on the CPU, x must be float32 or float64, got Half"):
        torch.ops.mamlfast.batch_norm_forward(x, weight, weight, 1e-5)
    x, segment = torch.ones(2, 4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"segment ids must lie in \[0, 3\), got 3"):
        torch.ops.mamlfast.segment_axpy(x, torch.ones(3), segment, None)
    with pytest.raises(ValueError, match=r"segment ids must lie in \[0, 3\), got 3"):
        torch.ops.mamlfast.segment_dot(x, x, segment.int(), 3)


@gpu
def test_out_of_range_segment_ids_stop_the_kernel():
    """Segment ids are read on the device, which checks them: a device-side assertion, run in
    a process of its own since it leaves the CUDA context unusable."""
    if load_error():
        pytest.skip(load_error())
    program = ("import torch, mamlfast._C\n"
               "x = torch.ones(2, 4, device='cuda')\n"
               "segment = torch.tensor([0, 1, 2, 3], device='cuda')\n"
               "torch.ops.mamlfast.segment_axpy(x, torch.ones(3, device='cuda'), segment, None)\n"
               "torch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "id >= 0 && id < segments" in result.stdout + result.stderr
