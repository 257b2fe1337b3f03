"""The hot ops on the torch backend: values against their definitions, gradcheck, gradgradcheck."""

import logging

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import mamlfast.ops.extension
from mamlfast import ops
from mamlfast.ops import backends


def _activations(samples=3, tasks=2, channels=5, size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, tasks * channels, size, size, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    return x, weight, bias


def _task_batch_norm_by_definition(x, weight, bias, tasks, eps=1e-5):
    out = []
    for chunk in x.chunk(tasks, dim=1):  # [N, C, H, W] per task
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        out.append((chunk - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    return torch.cat(out, dim=1)


def test_task_batch_norm_normalises_each_task_and_channel():
    x, weight, bias = _activations(tasks=3)
    torch.testing.assert_close(ops.task_batch_norm(x, weight, bias, backend="torch"),
                               _task_batch_norm_by_definition(x, weight, bias, tasks=3))


def test_task_batch_norm_running_statistics():
    x, weight, bias = _activations(samples=4, tasks=2, channels=3, size=2)
    running_mean, running_var = torch.full((3,), 0.5, dtype=x.dtype), torch.full((3,), 2.0, dtype=x.dtype)
    ops.task_batch_norm(x, weight, bias, running_mean, running_var, momentum=0.25, backend="torch")
    per_task = x.view(4, 2, 3, 2, 2).transpose(0, 1).transpose(1, 2).reshape(2, 3, -1)  # [B, C, N*H*W]
    torch.testing.assert_close(running_mean, 0.75 * 0.5 + 0.25 * per_task.mean(-1).mean(0))
    torch.testing.assert_close(running_var, 0.75 * 2.0 + 0.25 * per_task.var(-1, unbiased=True).mean(0))
    eval_out = ops.task_batch_norm(x, weight, bias, running_mean, running_var, training=False, backend="torch")
    expected = ((x.view(4, 2, 3, 2, 2) - running_mean.view(1, 1, 3, 1, 1)) / torch.sqrt(running_var.view(1, 1, 3, 1, 1) + 1e-5)
                * weight.view(1, 1, 3, 1, 1) + bias.view(1, 1, 3, 1, 1)).view_as(x)
    torch.testing.assert_close(eval_out, expected)


@pytest.mark.parametrize("training", [True, False])
def test_task_batch_norm_gradcheck_and_gradgradcheck(training):
    x, weight, bias = _activations(samples=3, tasks=2, channels=3, size=3)
    stats = (torch.randn(3, dtype=x.dtype), torch.rand(3, dtype=x.dtype) + 0.5)

    def f(x, weight, bias):
        if training:  # running statistics are updated, never differentiated: use scratch copies
            return ops.task_batch_norm(x, weight, bias, stats[0].clone(), stats[1].clone(), backend="torch")
        return ops.task_batch_norm(x, weight, bias, *stats, training=False, backend="torch")

    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_lslr_update_values_and_derivatives():
    g = torch.Generator().manual_seed(1)
    params = torch.randn(3, 7, generator=g, dtype=torch.float64)
    grads = torch.randn(3, 7, generator=g, dtype=torch.float64)
    lrs = torch.rand(3, generator=g, dtype=torch.float64)
    segments = ops.segment_ids_for([2, 4, 1])
    assert segments.tolist() == [0, 0, 1, 1, 1, 1, 2]
    out = ops.lslr_update(params, grads, lrs, segments, backend="torch")
    expected = params - torch.cat([lrs[0].repeat(2), lrs[1].repeat(4), lrs[2].repeat(1)]) * grads
    torch.testing.assert_close(out, expected)
    inputs = tuple(t.requires_grad_() for t in (params, grads, lrs))

    def f(p, gr, lr):
        return ops.lslr_update(p, gr, lr, segments, backend="torch")

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_shape_errors_name_the_problem():
    x, weight, bias = _activations(channels=5)
    with pytest.raises(ValueError, match="not a multiple of C=4"):
        ops.task_batch_norm(x, weight[:4], bias[:4])
    with pytest.raises(ValueError, match=r"\[N, B\*C, H, W\]"):
        ops.task_batch_norm(x[0], weight, bias)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        ops.task_batch_norm(x, weight, bias, training=False)
    with pytest.raises(ValueError, match="segment_ids"):
        ops.lslr_update(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="params and grads"):
        ops.lslr_update(torch.zeros(2, 3), torch.zeros(3, 2), torch.ones(1), torch.zeros(3, dtype=torch.long))


def test_unknown_backend_is_an_error():
    x, weight, bias = _activations()
    with pytest.raises(ops.BackendUnavailable, match="unknown backend 'tpu'"):
        ops.task_batch_norm(x, weight, bias, backend="tpu")


def test_auto_takes_the_compiled_kernels_on_the_cpu_where_they_are_built():
    cpu = torch.device("cpu")
    assert ops.resolve("auto", cpu) == ("cpp" if ops.availability(cpu)["cpp"] is None else "torch")


def test_auto_says_once_why_it_passes_over_an_extension_that_does_not_load(monkeypatch, caplog):
    stale = "the extension mamlfast._C is older than mamlfast's Python code (it has no operator mamlfast::x): reinstall"
    monkeypatch.setattr(mamlfast.ops.extension, "load_error", lambda: stale)
    monkeypatch.setattr(backends, "_said_cannot_run", set())
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert ops.resolve("auto", cpu) == "torch"
        assert ops.resolve("auto", cpu, torch.float64) == "torch"
        assert backends.auto_by_known_verdicts(cpu) == "torch"  # mamlfast info reports, and says nothing here
    (warning,) = caplog.records
    assert warning.getMessage() == f"backend='auto' cannot use 'cpp' on cpu: {stale}; it takes 'torch' instead"
