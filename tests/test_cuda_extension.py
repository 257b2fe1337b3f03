"""The compiled extension: it is built where CI expects it, refuses CPU tensors clearly, and its
operators pass torch.library.opcheck on a GPU. Its numerics are tested with the Triton
backend's in test_fused_backends.py."""

import os

import pytest
import torch

from conftest import DEVICE
from mamlfast import ops
from mamlfast.ops.cuda_extension import load_error

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


@pytest.fixture
def extension():
    if load_error():
        if os.environ.get("MAMLFAST_EXPECT_CUDA_EXTENSION") == "1":
            pytest.fail(f"MAMLFAST_EXPECT_CUDA_EXTENSION=1 but {load_error()}")
        pytest.skip(load_error())


def test_extension_loads_and_registers_its_operators(extension):
    import mamlfast._C  # noqa: F401
    for name in ("batch_norm_forward", "batch_norm_backward", "batch_norm_double_backward",
                 "segment_axpy", "segment_dot"):
        assert hasattr(torch.ops.mamlfast, name)


def test_cpu_tensors_get_a_clear_error(extension):
    x, weight, bias = torch.randn(2, 4, 3, 3), torch.ones(2), torch.zeros(2)
    with pytest.raises(RuntimeError, match="batch_norm_forward runs on CUDA tensors only"):
        torch.ops.mamlfast.batch_norm_forward(x, weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="segment_axpy runs on CUDA tensors only"):
        torch.ops.mamlfast.segment_axpy(torch.ones(2, 3), torch.ones(1), torch.zeros(3, dtype=torch.long), None)
    with pytest.raises(ops.BackendUnavailable, match="the CUDA extension needs CUDA tensors, got cpu"):
        ops.task_batch_norm(x, weight, bias, backend="cuda")


def test_unbuilt_extension_is_named_as_the_reason():
    reason = ops.availability(torch.device("cuda"))["cuda"]
    if load_error():
        assert reason == load_error() and "CUDA extension" in reason


@gpu
def test_operators_pass_opcheck(extension):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 4, 4, generator=g).cuda()
    weight, bias = torch.rand(3, generator=g).cuda() + 0.5, torch.randn(3, generator=g).cuda()
    _, mean, _, rstd = torch.ops.mamlfast.batch_norm_forward(x, weight, bias, 1e-5)
    segment = ops.segment_ids_for([3, 5]).cuda()
    flat, other = torch.randn(2, 8, generator=g).cuda(), torch.randn(2, 8, generator=g).cuda()
    samples = {
        "batch_norm_forward": (x, weight, bias, 1e-5),
        "batch_norm_backward": (torch.randn_like(x), x, weight, mean, rstd),
        "batch_norm_double_backward": (torch.randn_like(x), x, weight, mean, rstd, torch.randn_like(x),
                                       torch.randn_like(weight), torch.randn_like(bias)),
        "segment_axpy": (flat, torch.randn(2).cuda(), segment, other),
        "segment_dot": (flat, other, segment, 2),
    }
    for name, args in samples.items():
        torch.library.opcheck(getattr(torch.ops.mamlfast, name).default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_batch_norm(extension, dtype):
    """float16/bfloat16 inputs accumulate in float32: as accurate as torch's own."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 12, 7, 7, generator=g) * 2 + 1).cuda().to(dtype)
    weight, bias = torch.rand(4, generator=g).cuda().to(dtype) + 0.5, torch.randn(4, generator=g).cuda().to(dtype)
    fused = ops.task_batch_norm(x, weight, bias, backend="cuda")
    exact = ops.task_batch_norm(x.double(), weight.double(), bias.double(), backend="torch")
    rounding = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(fused.double(), exact, rtol=rounding, atol=rounding * 4)
