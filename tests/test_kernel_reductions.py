"""The fused kernels' sums: groups split over several programs (blocks), partial sums added in a
fixed order, segments in any order, zero sizes; the same inputs give bitwise the same outputs.

Triton runs in its interpreter without a GPU (tiny shapes, splitting forced by the tests); the
CUDA extension's cases run on a GPU only, at shapes its own policy splits (at least 2048 values
per block, while the grid has fewer than 2 blocks per multiprocessor).
"""

import functools
from dataclasses import asdict

import pytest
import torch

from conftest import DEVICE, perturbed_learner, random_batch, with_backend
from mamlfast import ops
from mamlfast.ops import batch_norm_triton
from mamlfast.ops.comparison import OP_TOLERANCES
from test_fused_backends import _derivatives, _inputs

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


def _require(backend):
    reason = ops.availability(torch.device(DEVICE))[backend]
    if reason:
        pytest.skip(reason)


def _force_triton_split(monkeypatch):
    """Triton: every group over 3 programs (fewer if too small) of blocks of 16 values."""
    monkeypatch.setattr(batch_norm_triton, "MAX_BLOCK", 16)
    monkeypatch.setattr(batch_norm_triton, "programs_per_group", lambda groups, values, device, programs_per_sm: 3)


def _case_id(value):
    return ("forced" if value else "natural") if isinstance(value, bool) else str(value)


# (backend, (samples N, tasks B, channels C, side H=W), split forced). Triton forced to 3 programs
# of 16-value blocks: 75 values (chunks 32, 32, 11), 63 (32, 31), 33 (16, 16, 1), 5 (one program),
# 32 with HW=16 (runs of 2 float64 or 4 float32 values). By their own policies on a GPU: CUDA
# (3 channels on one task) 6727 values in 3 blocks of 2243, 2243, 2241 single values, 7056 in 3
# blocks of 1176 runs of 2 (float64), 4500 in 2; Triton 19220 values in 2 programs.
SPLIT_CASES = ([("triton", shape, True) for shape in [(3, 2, 1, 5), (7, 1, 1, 3), (33, 1, 1, 1), (5, 1, 2, 1),
                                                      (2, 1, 2, 4)]]
               + [("cuda", shape, False) for shape in [(7, 1, 3, 31), (9, 1, 3, 28), (5, 1, 3, 30)]]
               + [pytest.param("triton", (20, 1, 3, 31), False, marks=gpu)])


@pytest.mark.parametrize("backend, shape, forced", SPLIT_CASES, ids=_case_id)
def test_batch_norm_over_split_groups_matches_torch_to_second_order(backend, shape, forced, monkeypatch):
    _assert_split_groups_match_torch(backend, shape, forced, monkeypatch, torch.float64)


@pytest.mark.parametrize("backend, shape, forced", [("triton", (2, 1, 3, 4), True), ("cuda", (9, 1, 3, 28), False),
                                                    pytest.param("triton", (20, 1, 3, 32), False, marks=gpu)],
                         ids=_case_id)
def test_batch_norm_float32_runs_over_split_groups(backend, shape, forced, monkeypatch):
    """float32 loads runs of 4 values (16 bytes) where HW allows."""
    _assert_split_groups_match_torch(backend, shape, forced, monkeypatch, torch.float32)


def _assert_split_groups_match_torch(backend, shape, forced, monkeypatch, dtype):
    """Values, first and second derivatives of ``backend``'s batch norm against torch's."""
    _require(backend)
    if forced:
        _force_triton_split(monkeypatch)
    inputs = _inputs(shape, dtype)
    names = ["out", "dx", "dweight", "dbias", "ddx", "ddweight", "ddbias"]
    for name, fused, reference in zip(names, _derivatives(backend, *inputs), _derivatives("torch", *inputs)):
        torch.testing.assert_close(fused, reference, **asdict(OP_TOLERANCES[dtype]), msg=name)


def test_triton_variants_split_groups_over_more_programs_per_multiprocessor(monkeypatch):
    """On 132 multiprocessors, mini-ImageNet's first stage (96 groups of 5 x 84 x 84 values): the default
    variant gives 2 programs per multiprocessor (3 per group), the overlapped one up to 8 (11 per group,
    here 4, as chunks keep at least 8192 values); the default leaves 264 groups or more whole."""
    monkeypatch.setattr(batch_norm_triton, "_multiprocessors", lambda device: 132)
    per_sm = batch_norm_triton.PROGRAMS_PER_SM
    assert batch_norm_triton.programs_per_group(96, 35280, None, per_sm["default"]) == 3
    assert batch_norm_triton.programs_per_group(96, 35280, None, per_sm["overlapped"]) == 4
    assert batch_norm_triton.programs_per_group(96, 200_000, None, per_sm["overlapped"]) == 11
    assert batch_norm_triton.programs_per_group(264, 200_000, None, per_sm["default"]) == 1


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_batch_norm_gradgradcheck_over_split_groups(backend, monkeypatch):
    _require(backend)
    _force_triton_split(monkeypatch)
    # triton: 2 programs per group (16 + 2 values); cuda: 2 blocks of 2048 values per group
    shape = (2, 1, 1, 3) if backend == "triton" else (4, 1, 1, 32)
    inputs = [t.requires_grad_() for t in _inputs(shape, torch.float64)]

    def f(x, weight, bias):
        return ops.task_batch_norm(x, weight, bias, backend=backend)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend, shape, forced", [
    ("triton", (3, 1, 2, 3), True), ("cuda", (9, 1, 3, 28), False), ("cuda", (75, 2, 48, 21), False),
    pytest.param("triton", (75, 2, 48, 21), False, marks=gpu)], ids=_case_id)
def test_batch_norm_is_bitwise_reproducible(backend, shape, forced, monkeypatch):
    """The same inputs, the same bits: every sum in a fixed order, however the blocks are
    scheduled (on a GPU: several blocks per group; (75, 2, 48, 21) is the third stage's batch
    norm of a mini-ImageNet 5-way query set), and whether or not x's memory allows vector loads."""
    _require(backend)
    if forced:
        _force_triton_split(monkeypatch)
    x, weight, bias = _inputs(shape, torch.float32)
    names = ["out", "dx", "dweight", "dbias", "ddx", "ddweight", "ddbias"]
    expected = _derivatives(backend, x, weight, bias)
    misaligned = torch.empty(x.numel() + 1, device=x.device)[1:].view_as(x).copy_(x)  # 4 bytes off 16
    for again in [x, misaligned] + [x] * (8 if DEVICE == "cuda" else 0):
        for name, value, first in zip(names, _derivatives(backend, again, weight, bias), expected):
            assert torch.equal(value, first), f"{name} changed"


def _segment_case(columns, segments, rows=3, order="shuffled", index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.full((segments,), columns // segments)
    sizes[: columns % segments] += 1
    ids = ops.segment_ids_for(sizes.tolist())
    if order == "shuffled":
        ids = ids[torch.randperm(columns, generator=g)]
    params, grads = (torch.randn(rows, columns, generator=g, dtype=torch.float64) for _ in range(2))
    lrs = torch.rand(segments, generator=g, dtype=torch.float64)
    return [t.to(DEVICE) for t in (params, grads, lrs, ids.to(index_dtype))]


def _lslr_derivatives(backend, params, grads, lrs, ids):
    """Output, first derivatives, and second derivatives along a fixed direction, of the LSLR update
    by ``backend``: a backend's name, or a function of (params, grads, lrs, ids)."""
    update = backend if callable(backend) else functools.partial(ops.lslr_update, backend=backend)
    inputs = [t.detach().requires_grad_() for t in (params, grads, lrs)]
    out = update(*inputs, ids)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    first = torch.autograd.grad(out, inputs, upstream, create_graph=True)
    second = torch.autograd.grad(first[1].square().sum() + first[2].square().sum(), inputs,
                                 allow_unused=True, materialize_grads=True)
    return [out, *first, *second]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("order, index_dtype", [("shuffled", torch.int64), ("shuffled", torch.int32),
                                                ("sorted", torch.int32)])
def test_lslr_update_with_segment_ids_in_any_order(backend, order, index_dtype):
    """1500 columns: one block and a part, segments spread over both in any order."""
    _require(backend)
    case = _segment_case(1500, 5, order=order, index_dtype=index_dtype)
    for fused, reference in zip(_lslr_derivatives(backend, *case), _lslr_derivatives("torch", *case)):
        torch.testing.assert_close(fused, reference, **asdict(OP_TOLERANCES[torch.float64]))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_segment_dot_is_bitwise_reproducible(backend):
    """The rate gradient sums over all rows and the columns of each segment. On a GPU, 4 tasks
    and 200000 columns (the size of the Omniglot backbone): several hundred blocks add to each
    segment, where atomic adds would change the last bits from call to call."""
    _require(backend)
    columns = 200_000 if DEVICE == "cuda" else 2500
    params, grads, lrs, ids = _segment_case(columns, 10, rows=4, order="sorted")
    params, grads, lrs = (t.float() for t in (params, grads, lrs))
    lrs.requires_grad_()
    out = ops.lslr_update(params, grads, lrs, ids, backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    first = torch.autograd.grad(out, lrs, upstream, retain_graph=True)[0]
    misaligned = torch.empty(upstream.numel() + 1, device=upstream.device)[1:].view_as(upstream).copy_(upstream)
    for again in [upstream, misaligned] + [upstream] * (20 if DEVICE == "cuda" else 1):
        assert torch.equal(torch.autograd.grad(out, lrs, again, retain_graph=True)[0], first)
    # d out[b, p] / d lrs[t] = -grads[b, p] on the columns of segment t
    per_column = (upstream.double() * -grads.double()).sum(0)
    exact = torch.zeros(10, dtype=torch.float64, device=DEVICE).index_add_(0, ids, per_column)
    torch.testing.assert_close(first.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cuda", "cpp"])
@pytest.mark.parametrize("rows, columns", [(0, 7), (3, 0), (0, 0)])
def test_lslr_update_of_zero_size(backend, rows, columns):
    _require(backend)
    params, grads = (torch.zeros(rows, columns, dtype=torch.float64, device=DEVICE) for _ in range(2))
    lrs = torch.rand(2, dtype=torch.float64, device=DEVICE)
    ids = torch.zeros(columns, dtype=torch.int64, device=DEVICE)
    for fused, reference in zip(_lslr_derivatives(backend, params, grads, lrs, ids),
                                _lslr_derivatives("torch", params, grads, lrs, ids)):
        torch.testing.assert_close(fused, reference, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda", "cpp"])
@pytest.mark.parametrize("shape", [(0, 2, 3, 3), (4, 2, 3, 0)], ids=["no samples", "no pixels"])
def test_batch_norm_of_groups_without_values(backend, shape):
    """Nothing to normalise: empty outputs, zero gradients of the affine parameters, and
    running statistics left as they were, as torch's own batch norm does."""
    _require(backend)
    samples, tasks, channels, side = shape
    x = torch.zeros(samples, tasks * channels, side, side, dtype=torch.float64, device=DEVICE)
    weight = torch.ones(channels, dtype=torch.float64, device=DEVICE)
    bias = torch.zeros_like(weight)
    running = (torch.full_like(weight, 0.5), torch.full_like(weight, 2.0))
    ops.task_batch_norm(x, weight, bias, *running, backend=backend)
    assert running[0].eq(0.5).all() and running[1].eq(2.0).all()
    for fused, reference in zip(_derivatives(backend, x, weight, bias), _derivatives("torch", x, weight, bias)):
        torch.testing.assert_close(fused, reference, rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_learner_meta_gradients_are_bitwise_reproducible(backend, small_cfg, monkeypatch):
    """A whole second-order meta-iteration, twice from the same state: the same bits. The
    convolutions come from cuDNN, deterministic when asked."""
    _require(backend)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = small_cfg.replace(first_order_epochs=0)
    learner = perturbed_learner(cfg, dtype=torch.float32).to(DEVICE)
    batch = random_batch(cfg, 3, dtype=torch.float32, device=DEVICE)
    runs = []
    for _ in range(2):
        clone = with_backend(learner, backend)
        clone(batch, 0).loss.backward()
        runs.append({name: p.grad for name, p in clone.named_parameters()})
    for name, grad in runs[0].items():
        assert torch.equal(grad, runs[1][name]), f"meta-gradient of {name} changed"
