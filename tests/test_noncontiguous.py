"""Inputs that are views of memory they do not fill (a column of a matrix, every other element)
give the torch backend's results on every backend, to the second derivative: the fused kernels
index the tensors they get as contiguous, and get them so. The CUDA kernels' path runs on HIP-CPU
(tests/hipcpu.py): the ops' autograd functions with its kernels. The gaps between a view's values
hold NaN, or for segment ids another valid id, so that a kernel reading them shows.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import device_of, usable
from mamlfast import ops
from mamlfast.ops import batch_norm, lslr
from test_conv import _derivatives as _conv_derivatives
from test_fused_backends import _derivatives as _batch_norm_derivatives
from test_fused_backends import _inputs as _batch_norm_inputs
from test_kernel_reductions import _lslr_derivatives
from test_max_pool import _derivatives as _pool_derivatives

HIPCPU = "cuda-on-hipcpu"
BACKENDS = ["torch", "cpp", "triton", pytest.param(HIPCPU, marks=pytest.mark.hipcpu)]


def _strided(t: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """t's values in a view of every other element of memory, ``gaps`` in between; differentiable in t."""
    view = torch.stack([t, gaps], -1)[..., 0]
    assert not view.is_contiguous()
    return view


def _nan_gaps(t: torch.Tensor) -> torch.Tensor:
    return _strided(t, torch.full_like(t, float("nan")))


def _device(backend: str) -> str:
    return "cpu" if backend == HIPCPU else device_of(backend)


def _task_batch_norm(backend, request):
    """task_batch_norm(x, weight, bias) of ``backend``, in training mode."""
    if backend == HIPCPU:
        kernels = request.getfixturevalue("hipcpu").batch_norm_kernels
        return lambda x, weight, bias: batch_norm._fused_task_batch_norm(kernels, x, weight, bias, None, None, True,
                                                                          0.1, 1e-5)
    return functools.partial(ops.task_batch_norm, backend=usable(backend))


def _lslr_update(backend, request):
    if backend == HIPCPU:
        return functools.partial(lslr._fused_lslr_update, request.getfixturevalue("hipcpu").lslr_kernels)
    return functools.partial(ops.lslr_update, backend=usable(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_of_views(backend, request):
    """x, weight and bias as views (a [C] column of a [C, S] tensor is one, W[:, s])."""
    norm = _task_batch_norm(backend, request)
    inputs = _batch_norm_inputs((3, 2, 3, 5), torch.float64, device=_device(backend))
    expected = _batch_norm_derivatives("torch", *inputs)
    actual = _batch_norm_derivatives(lambda *tensors: norm(*map(_nan_gaps, tensors)), *inputs)
    names = ["out", "dx", "dweight", "dbias", "ddx", "ddweight", "ddbias"]
    for name, a, e in zip(names, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lslr_update_of_views(backend, index_dtype, request):
    """params, grads, rates and unsorted segment ids as views; between the ids lie other valid ids."""
    update = _lslr_update(backend, request)
    g = torch.Generator().manual_seed(0)
    ids = ops.segment_ids_for([300, 1, 250, 149])[torch.randperm(700, generator=g)].to(index_dtype)
    params, grads = (torch.randn(3, 700, generator=g, dtype=torch.float64) for _ in range(2))
    lrs = torch.rand(4, generator=g, dtype=torch.float64)
    case = [t.to(_device(backend)) for t in (params, grads, lrs, ids)]

    def on_views(params, grads, lrs, ids):
        return update(_nan_gaps(params), _nan_gaps(grads), _nan_gaps(lrs), _strided(ids, (ids + 1) % 4))

    for a, e in zip(_lslr_derivatives(on_views, *case), _lslr_derivatives("torch", *case), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_pooling_and_convolution_of_views(backend):
    """Only the cpp backend has kernels of its own for these; the others run PyTorch's, on CUDA tensors too."""
    usable(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 7, generator=g, dtype=torch.float64).to(device_of(backend))
    for e, a in zip(_pool_derivatives(lambda t: F.max_pool2d(t, 2), x),
                    _pool_derivatives(lambda t: ops.max_pool2x2(_nan_gaps(t), backend=backend), x), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    x, weight, bias = (torch.randn(*size, generator=g, dtype=torch.float64).to(device_of(backend)).requires_grad_()
                       for size in ((3, 4, 6, 7), (6, 2, 3, 3), (6,)))
    expected = _conv_derivatives(lambda *a: F.conv2d(*a, padding=1, groups=2), x, weight, bias)
    actual = _conv_derivatives(lambda *a: ops.grouped_conv2d(*map(_nan_gaps, a), padding=1, groups=2,
                                                             backend=backend), x, weight, bias)
    for e, a in zip(expected, actual, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
