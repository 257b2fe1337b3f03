"""The fused backends (Triton, the compiled extension on CPU and CUDA tensors) against the
torch backend and the reference.

``cpp`` runs the extension's CPU kernels on CPU tensors on every machine where the extension is
built. Without a GPU, Triton runs in its interpreter on CPU tensors (TRITON_INTERPRET=1, set in
conftest.py), so the shapes are small, and the CUDA cases skip; with a GPU Triton and CUDA run
compiled, on CUDA tensors.
"""

import functools
from dataclasses import asdict

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import mamlfast
from conftest import DEVICE, device_of, perturbed_learner, random_batch, relative_errors, usable, with_backend
from mamlfast import ops
from mamlfast.learner_check import LEARNER_TOLERANCES
from mamlfast.ops.batch_norm import KERNEL_VARIANTS
from mamlfast.ops.comparison import OP_TOLERANCES


@pytest.fixture(params=["cpp", "triton", "cuda"])
def backend(request):
    return usable(request.param)


# (samples N, tasks B, channels C, side H=W): odd sizes, one sample, one task, one pixel, and
# groups of 6*27*27 = 4374 values, beyond one block (2048) and the one-pass forward (4096)
SHAPES = [(3, 2, 3, 5), (1, 3, 5, 3), (5, 1, 2, 1), (6, 1, 3, 27)]


def _inputs(shape, dtype, seed=0, device=DEVICE):
    samples, tasks, channels, side = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, tasks * channels, side, side, generator=g, dtype=dtype) * 3 + 2
    weight = torch.rand(channels, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(channels, generator=g, dtype=dtype)
    return [t.to(device) for t in (x, weight, bias)]


def _derivatives(backend, x, weight, bias, seed=1):
    """Output, first derivatives, and second derivatives along a random direction, of batch norm by
    ``backend``: a backend's name, or a function of (x, weight, bias)."""
    norm = backend if callable(backend) else functools.partial(ops.task_batch_norm, backend=backend)
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    g = torch.Generator().manual_seed(seed)
    out = norm(x, weight, bias)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    first = torch.autograd.grad(out, (x, weight, bias), upstream, create_graph=True)
    directions = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in first]
    projection = sum((f * d).sum() for f, d in zip(first, directions))
    second = torch.autograd.grad(projection, (x, weight, bias), allow_unused=True, materialize_grads=True)
    return [out, *first, *second]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_matches_torch_to_second_order(backend, shape):
    inputs = _inputs(shape, torch.float64, device=device_of(backend))
    for name, fused, reference in zip(["out", "dx", "dweight", "dbias", "ddx", "ddweight", "ddbias"],
                                      _derivatives(backend, *inputs), _derivatives("torch", *inputs)):
        torch.testing.assert_close(fused, reference, **asdict(OP_TOLERANCES[torch.float64]), msg=name)


def test_batch_norm_float32_and_running_statistics(backend):
    device = device_of(backend)
    x, weight, bias = _inputs((6, 2, 3, 27), torch.float32, device=device)
    names = (backend, "torch")
    stats = {name: (torch.zeros(3, device=device), torch.ones(3, device=device)) for name in names}
    outs = {name: ops.task_batch_norm(x, weight, bias, *stats[name], momentum=0.3, backend=name) for name in names}
    torch.testing.assert_close(outs[backend], outs["torch"], rtol=1e-5, atol=1e-5)
    for fused, reference in zip(stats[backend], stats["torch"]):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    evaluated = {name: ops.task_batch_norm(x, weight, bias, *stats[name], training=False, backend=name)
                 for name in names}
    torch.testing.assert_close(evaluated[backend], evaluated["torch"])


@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_batch_norm_kernel_variants_match_torch_to_second_order(backend, variant):
    """Each backend takes the variant (the cpp kernels have one shape); the hipcpu tests check the CUDA
    kernels of each variant against the CPU kernels, test_kernel_reductions the Triton programs per group."""
    inputs = _inputs((6, 1, 3, 27), torch.float64, device=device_of(backend))
    fused = functools.partial(ops.task_batch_norm, backend=backend, kernel_variant=variant)
    for name, a, e in zip(["out", "dx", "dweight", "dbias", "ddx", "ddweight", "ddbias"],
                          _derivatives(fused, *inputs), _derivatives("torch", *inputs), strict=True):
        torch.testing.assert_close(a, e, **asdict(OP_TOLERANCES[torch.float64]), msg=name)


def test_float64_eps_is_not_rounded_to_float32(backend):
    """Groups whose variance (about 1e-9) is far below eps: 1/sqrt(var + eps) follows eps, which rounded to
    float32 (9.99999975e-6) would move the outputs by up to 5e-10 here. Compiled Triton passed eps as float32
    before; its interpreter, the extension and torch never did."""
    x, weight, bias = _inputs((4, 2, 3, 5), torch.float64, device=device_of(backend))
    x = (x - 2) * 1e-5
    torch.testing.assert_close(ops.task_batch_norm(x, weight, bias, eps=1e-5, backend=backend),
                               ops.task_batch_norm(x, weight, bias, eps=1e-5, backend="torch"), rtol=1e-13, atol=1e-13)


def test_batch_norm_gradcheck_and_gradgradcheck(backend):
    inputs = [t.requires_grad_() for t in _inputs((3, 2, 2, 2), torch.float64, device=device_of(backend))]

    def f(x, weight, bias):
        return ops.task_batch_norm(x, weight, bias, backend=backend)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_lslr_update_matches_torch_and_passes_gradcheck(backend):
    # 5000 columns: not a multiple of Triton's block (1024) or the CPU kernels' chunk (2048), with
    # segments straddling both
    device = device_of(backend)
    segments = ops.segment_ids_for([700, 1, 3000, 1299]).to(device)
    g = torch.Generator().manual_seed(0)
    params, grads = (torch.randn(3, 5000, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    lrs = torch.rand(4, generator=g, dtype=torch.float64).to(device)
    results = {}
    for name in (backend, "torch"):
        inputs = [t.detach().requires_grad_() for t in (params, grads, lrs)]
        out = ops.lslr_update(*inputs, segments, backend=name)
        upstream = torch.ones_like(out) * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype, device=device)
        first = torch.autograd.grad(out, inputs, upstream, create_graph=True)
        second = torch.autograd.grad(first[1].square().sum() + first[2].square().sum(), inputs[1:])
        results[name] = [out, *first, *second]
    for fused, reference in zip(results[backend], results["torch"]):
        torch.testing.assert_close(fused, reference, **asdict(OP_TOLERANCES[torch.float64]))

    small = ops.segment_ids_for([2, 3, 1]).to(device)
    inputs = [torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
              for shape in ((2, 6), (2, 6), (3,))]

    def f(p, gr, lr):
        return ops.lslr_update(p, gr, lr, small, backend=backend)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


LEARNER_CASES = {
    "maml++ second order with MSL": ("maml++", dict(first_order_epochs=0), 0),
    "maml++ first-order phase": ("maml++", {}, 0),
    "fomaml": ("fomaml", {}, 3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(LEARNER_CASES))
def test_learner_on_fused_backend_matches_the_reference(backend, case, dtype):
    """float32: the paths sum in different orders, and float32 rounding (6e-8 per op) over
    the few hundred ops of two chained second-order steps leaves about 1e-6 relative error in
    the meta-gradients (the torch path shows the same against the reference, up to 4e-6), and
    noise of about 2e-7 of the largest gradient in those that are zero in exact arithmetic.
    Tolerance 1e-4, with tensors below 1% of the largest gradient compared at that 1%, leaves
    a margin of 25 or more while a wrong formula errs by order one; float64 checks to 1e-6."""
    tolerance, floor = LEARNER_TOLERANCES[dtype]
    variant, overrides, epoch = LEARNER_CASES[case]
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", variant, image_size=16, num_filters=3, inner_steps=2,
                                     eval_inner_steps=2, **overrides)
    learner = perturbed_learner(cfg, dtype=dtype).to(device_of(backend))
    batch = random_batch(cfg, 2, dtype=dtype, device=device_of(backend))
    results = {}
    for name in ("loop", backend):
        clone = with_backend(learner, name)
        out = clone(batch, epoch)
        out.loss.backward()
        results[name] = out, {param: p.grad for param, p in clone.named_parameters()}
    (ref_out, ref_grads), (out, grads) = results["loop"], results[backend]
    assert abs(out.loss.item() - ref_out.loss.item()) <= tolerance * abs(ref_out.loss.item())
    worst = max(relative_errors(ref_grads, grads, floor=floor).items(), key=lambda item: item[1])
    assert worst[1] <= tolerance, f"meta-gradient of {worst[0]} differs by {worst[1]:.2e} relative"


def test_triton_is_refused_where_it_cannot_run(monkeypatch):
    x, weight, bias = _inputs((2, 1, 2, 2), torch.float32, device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ops.BackendUnavailable, match="Triton kernels need CUDA tensors"):
        ops.task_batch_norm(x, weight, bias, backend="triton")
