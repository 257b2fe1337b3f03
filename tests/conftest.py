import os

import numpy
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It is chosen
# when the kernels are defined, so it must be set before mamlfast imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mamlfast  # noqa: E402
# shared with the self-check's meta-iteration, which checks what these tests check
from mamlfast.learner_check import perturbed_learner, random_batch, relative_errors, with_backend  # noqa: E402, F401
from mamlfast.versions import release  # noqa: E402


def repair_triton_interpreter_loop_bounds():
    """Triton's interpreter before 3.8 reads a loop bound that is a kernel argument (``range(0, rows)``)
    with int() of a one-element array, which NumPy 1.25 deprecates (a warning at every launch) and 2.4
    refuses: "only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171).
    Triton 3.8 squeezes the array first; this does the same in older Tritons. It changes the
    interpreter only: compiled kernels never run it."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:  # the triton backend's tests skip, saying so
        return
    if release(triton.__version__) >= (3, 8) or release(numpy.__version__) < (1, 25):
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


def meta_iteration(learner: mamlfast.MAMLPlusPlus, batch: mamlfast.TaskBatch, epoch: int):
    """One meta-forward and outer backward: its output, the meta-gradients and the running statistics."""
    out = learner(batch, epoch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in learner.named_parameters()}
    buffers = {name: b.clone() for name, b in learner.named_buffers() if "running" in name}
    return out, grads, buffers


@pytest.fixture(autouse=True, scope="session")
def session_cache(tmp_path_factory):
    """The tests' own cache folder, never the user's: the fused backends' self-checks are recorded
    there once per session (and read by the processes the tests start), tests of data make their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAMLFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


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
