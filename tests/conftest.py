import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It is chosen
# when the kernels are defined, so it must be set before mamlfast imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mamlfast  # noqa: E402
# shared with the self-check's meta-iteration, which checks what these tests check
from mamlfast.learner_check import perturbed_learner, random_batch, relative_errors, with_backend  # noqa: E402, F401

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
def small_cfg():
    """Omniglot 5-way 1-shot MAML++ at a size the CPU runs in milliseconds."""
    return mamlfast.MAMLConfig.preset("omniglot-5w1s", image_size=16, num_filters=6, inner_steps=3,
                                      eval_inner_steps=3, meta_batch_size=3)
