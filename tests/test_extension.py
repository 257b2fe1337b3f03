"""The compiled extension mamlfast._C: it is built where CI expects it, its operators pass
torch.library.opcheck on each device whose kernels it holds, the CPU kernels are bitwise
reproducible for any number of threads, and bad arguments get one-line errors. Its numerics are
tested with the other fused backends' in test_fused_backends.py."""

import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE
from mamlfast import ops
from mamlfast.ops import extension as extension_module
from mamlfast.ops.extension import OPERATORS, cuda_kernels_error, load_error

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


@pytest.fixture
def extension():
    if load_error():
        if os.environ.get("MAMLFAST_EXPECT_CUDA_EXTENSION") == "1":
            pytest.fail(f"MAMLFAST_EXPECT_CUDA_EXTENSION=1 but {load_error()}")
        pytest.skip(load_error())


def test_extension_loads_and_registers_its_operators(extension):
    import mamlfast._C  # noqa: F401
    for name in OPERATORS:
        assert hasattr(torch.ops.mamlfast, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mamlfast::{name}", "CPU")


def test_an_extension_older_than_the_python_code_is_named_as_the_reason(extension, monkeypatch):
    monkeypatch.setattr(extension_module, "OPERATORS", OPERATORS + ("operator_of_a_later_version",))
    extension_module.load_error.cache_clear()
    try:
        assert extension_module.load_error() == (
            "the extension mamlfast._C is older than mamlfast's Python code (it has no operator "
            f"mamlfast::operator_of_a_later_version): {extension_module.REINSTALL}")
    finally:
        extension_module.load_error.cache_clear()


def test_the_cuda_kernels_are_built_where_expected():
    """CI sets MAMLFAST_EXPECT_CUDA_EXTENSION=1 on a machine with a CUDA toolkit: there a build
    that left the CUDA kernels out fails here, GPU or not."""
    if os.environ.get("MAMLFAST_EXPECT_CUDA_EXTENSION") != "1":
        pytest.skip("MAMLFAST_EXPECT_CUDA_EXTENSION is not 1")
    assert cuda_kernels_error() is None, cuda_kernels_error()


def test_each_backend_says_why_it_cannot_run(extension):
    x, weight, bias = torch.randn(2, 4, 3, 3), torch.ones(2), torch.zeros(2)
    with pytest.raises(ops.BackendUnavailable, match="(needs CUDA tensors, got cpu|built without its CUDA kernels)"):
        ops.task_batch_norm(x, weight, bias, backend="cuda")
    assert "got cuda ones" in ops.availability(torch.device("cuda"))["cpp"]


def test_unbuilt_extension_is_named_as_the_reason():
    if load_error():
        for backend in ("cpp", "cuda"):
            assert ops.availability(torch.device("cpu"))[backend] == load_error()


def _samples(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 4, 4, generator=g).to(device)
    weight, bias = (torch.rand(3, generator=g) + 0.5).to(device), torch.randn(3, generator=g).to(device)
    _, mean, _, rstd = torch.ops.mamlfast.batch_norm_forward(x, weight, bias, 1e-5)
    segment = ops.segment_ids_for([3, 5]).to(device)
    flat, other = torch.randn(2, 8, generator=g).to(device), torch.randn(2, 8, generator=g).to(device)
    return {
        "batch_norm_forward": (x, weight, bias, 1e-5),
        "batch_norm_backward": (torch.randn_like(x), x, weight, mean, rstd),
        "batch_norm_double_backward": (torch.randn_like(x), x, weight, mean, rstd, torch.randn_like(x),
                                       torch.randn_like(weight), torch.randn_like(bias)),
        "segment_axpy": (flat, torch.randn(2).to(device), segment, other),
        "segment_dot": (flat, other, segment, 2),
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_operators_pass_opcheck(extension, device):
    backend = "cpp" if device == "cpu" else "cuda"
    if ops.availability(torch.device(device))[backend]:
        pytest.skip(ops.availability(torch.device(device))[backend])
    for name, args in _samples(device).items():
        torch.library.opcheck(getattr(torch.ops.mamlfast, name).default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.fixture
def cpu_kernels(extension):
    if ops.availability(torch.device("cpu"))["cpp"]:
        pytest.skip(ops.availability(torch.device("cpu"))["cpp"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP is used on Linux only")
def test_cpu_kernels_are_compiled_to_run_on_torchs_threads(cpu_kernels):
    """at::parallel_for runs its loop on one thread in code compiled without OpenMP, silently."""
    import mamlfast._C
    binary = Path(mamlfast._C.__file__).read_bytes()
    assert b"GOMP_parallel" in binary or b"__kmpc_fork_call" in binary, "mamlfast._C has no OpenMP parallel region"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernels_are_bitwise_reproducible_for_any_number_of_threads(cpu_kernels, dtype):
    """Each group's and each segment's sums are added in an order fixed by the shape: sizes here
    split the work differently for 1, 2 and 3 threads (32 groups of 4374 values; 3 chunks of columns;
    192 planes to pool)."""
    g = torch.Generator().manual_seed(0)
    x, dy, ggx = (torch.randn(6, 32, 27, 27, generator=g, dtype=dtype) * 2 + 1 for _ in range(3))
    weight, bias = torch.rand(4, generator=g, dtype=dtype) + 0.5, torch.randn(4, generator=g, dtype=dtype)
    segment = ops.segment_ids_for([700, 1, 3000, 1299])
    flat, other = (torch.randn(3, 5000, generator=g, dtype=dtype) for _ in range(2))

    def run():
        y, mean, var, rstd = torch.ops.mamlfast.batch_norm_forward(x, weight, bias, 1e-5)
        pooled, argmax = torch.ops.mamlfast.max_pool2x2_forward(x)
        return [y, mean, var, rstd, *torch.ops.mamlfast.batch_norm_backward(dy, x, weight, mean, rstd),
                *torch.ops.mamlfast.batch_norm_double_backward(dy, x, weight, mean, rstd, ggx, weight, bias),
                torch.ops.mamlfast.segment_axpy(flat, weight, segment, other),
                torch.ops.mamlfast.segment_dot(flat, other, segment, 4), pooled, argmax,
                torch.ops.mamlfast.max_pool2x2_backward(pooled, argmax, 27, 27),
                torch.ops.mamlfast.max_pool2x2_double_backward(ggx, argmax)]

    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other_run in results[1:]:
        for expected, actual in zip(results[0], other_run):
            assert torch.equal(expected, actual)


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
