import copy
import os

import numpy
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It is chosen
# when the kernels are defined, so it must be set before mamlfast imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mamlfast  # noqa: E402
from mamlfast.versions import release  # noqa: E402


def repair_triton_interpreter_loop_bounds():
    """Triton's interpreter before 3.8 reads a loop bound that is a kernel argument (``range(0, rows)``)
    with int() of a one-element array, which NumPy 2.4 refuses: "only 0-dimensional arrays can be
    converted to Python scalars" (triton-lang/triton#9171). Triton 3.8 squeezes the array first; this
    does the same in older Tritons. It changes the interpreter only: compiled kernels never run it."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:  # the triton backend's tests skip, saying so
        return
    if release(triton.__version__) >= (3, 8) or release(numpy.__version__) < (2, 4):
        return
    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_squeezing_indices(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor_squeezing_indices


if mamlfast.ops.backends.interpreting_triton():
    repair_triton_interpreter_loop_bounds()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_of(backend: str) -> str:
    """Where an op backend's tests run: the cpp backend on CPU tensors, the others on DEVICE."""
    return "cpu" if backend == "cpp" else DEVICE


def usable(backend: str) -> str:
    """``backend``, or a skip saying why it cannot run here."""
    reason = mamlfast.ops.availability(torch.device(device_of(backend)))[backend]
    if reason:
        pytest.skip(reason)
    return backend


def random_batch(cfg: mamlfast.MAMLConfig, tasks: int, *, dtype=torch.float64, seed: int = 0,
                 device: str = "cpu") -> mamlfast.TaskBatch:
    """B tasks of Gaussian images; labels 0..N-1 in a different shuffled order per task."""
    generator = torch.Generator().manual_seed(seed)

    def split(per_class):
        x = torch.randn(tasks, cfg.n_way * per_class, cfg.image_channels, cfg.image_size, cfg.image_size,
                        generator=generator, dtype=dtype)
        y = torch.stack([torch.randperm(cfg.n_way, generator=generator).repeat_interleave(per_class)
                         for _ in range(tasks)])
        return x.to(device), y.to(device)

    return mamlfast.TaskBatch(*split(cfg.k_shot), *split(cfg.k_query))


def perturbed_learner(cfg: mamlfast.MAMLConfig, *, seed: int = 0, dtype=torch.float64) -> mamlfast.MAMLPlusPlus:
    """A learner whose every parameter and running statistic is moved off its initial value.

    Zero biases, unit BN weights, zero running means and equal learning rates hide bugs.
    """
    torch.manual_seed(seed)
    learner = mamlfast.MAMLPlusPlus(cfg).to(dtype)
    with torch.no_grad():
        for name, p in learner.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if name.startswith("inner_lrs") else 0.2))
        for name, b in learner.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(torch.rand_like(b) + 0.5)
    return learner


def with_backend(learner: mamlfast.MAMLPlusPlus, backend: str) -> mamlfast.MAMLPlusPlus:
    """An independent copy of ``learner`` that runs on ``backend``."""
    clone = copy.deepcopy(learner)
    clone.cfg = learner.cfg.replace(backend=backend)
    return clone


def meta_iteration(learner: mamlfast.MAMLPlusPlus, batch: mamlfast.TaskBatch, epoch: int):
    """One meta-forward and outer backward: its output, the meta-gradients and the running statistics."""
    out = learner(batch, epoch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in learner.named_parameters()}
    buffers = {name: b.clone() for name, b in learner.named_buffers() if "running" in name}
    return out, grads, buffers


def relative_errors(expected: dict, actual: dict, floor: float = 1e-6) -> dict:
    """max|a - e| / max|e| per tensor, where max|e| is at least ``floor`` times the largest value
    of all tensors: some tensors are zero in exact arithmetic (conv biases feed batch norm, which
    removes any per-channel constant, so their meta-gradients are rounding noise around zero)."""
    scale = max(t.abs().max().item() for t in expected.values())
    return {name: (actual[name] - e).abs().max().item() / max(e.abs().max().item(), floor * scale)
            for name, e in expected.items()}


@pytest.fixture
def hipcpu():
    """tests/hipcpu.py, the CUDA kernels on HIP-CPU, with its library built; a skip saying what is
    missing (HIP-CPU, TBB, the cpp operators to compare with), a failure under MAMLFAST_EXPECT_HIPCPU=1."""
    import hipcpu as kernels
    from mamlfast.ops.extension import load_error

    reason = kernels.unavailable_reason() or load_error()
    if reason:
        if os.environ.get("MAMLFAST_EXPECT_HIPCPU") == "1":
            pytest.fail(f"MAMLFAST_EXPECT_HIPCPU=1, but {reason}")
        pytest.skip(reason)
    kernels.library()
    yield kernels
    kernels.set_multiprocessors(0)


@pytest.fixture
def small_cfg():
    """Omniglot 5-way 1-shot MAML++ at a size the CPU runs in milliseconds."""
    return mamlfast.MAMLConfig.preset("omniglot-5w1s", image_size=16, num_filters=6, inner_steps=3,
                                      eval_inner_steps=3, meta_batch_size=3)
