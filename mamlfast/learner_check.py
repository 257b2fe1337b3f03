"""The learner's part of a fused backend's self-check (``mamlfast.ops.self_check``): one small
second-order meta-iteration with the multi-step loss, its meta-loss and every meta-gradient
against the torch backend's computed in float64 from the same values, at the tolerances of the
learner's tests (``LEARNER_TOLERANCES``).

It lives above the learner and the ops, so that the learner never names a backend and a backend
never knows about meta-learning; importing mamlfast adds it to every self-check.
"""

from __future__ import annotations

import copy
import math

import torch

from .config import MAMLConfig
from .learner import MAMLPlusPlus
from .ops import self_check
from .ops.comparison import Comparison, dtype_name
from .tasks import TaskBatch

# (tolerance, floor): max|actual - expected| <= tolerance * max(max|expected|, floor * the largest
# value of all tensors), per meta-gradient and for the meta-loss (relative_errors): the learner's
# tests' numbers. Not in float16 or bfloat16: there the torch backend's own second-order
# meta-gradients differ from float64's by 3% and 50% (benchmarks/RESULTS.md), so the fused ops are
# checked one by one only.
LEARNER_TOLERANCES = {torch.float64: (1e-6, 1e-6), torch.float32: (1e-4, 1e-2)}
# A meta-iteration that runs in milliseconds: two stages, two inner steps, two tasks.
CHECK_CONFIG = dict(image_size=8, num_filters=3, num_stages=2, inner_steps=2, eval_inner_steps=2,
                    meta_batch_size=2, first_order_epochs=0)


def relative_errors(expected: dict, actual: dict, floor: float = 1e-6) -> dict:
    """max|a - e| / max|e| per tensor, where max|e| is at least ``floor`` times the largest value
    of all tensors: some tensors are zero in exact arithmetic (conv biases feed batch norm, which
    removes any per-channel constant, so their meta-gradients are rounding noise around zero)."""
    scale = max(t.abs().max().item() for t in expected.values())
    return {name: (actual[name].to(e) - e).abs().max().item() / max(e.abs().max().item(), floor * scale)
            for name, e in expected.items()}


def perturbed_learner(cfg: MAMLConfig, *, seed: int = 0, dtype=torch.float64) -> MAMLPlusPlus:
    """A learner whose every parameter and running statistic is moved off its initial value.

    Zero biases, unit BN weights, zero running means and equal learning rates hide bugs.
    """
    torch.manual_seed(seed)
    learner = MAMLPlusPlus(cfg).to(dtype)
    with torch.no_grad():
        for name, p in learner.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if name.startswith("inner_lrs") else 0.2))
        for name, b in learner.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(torch.rand_like(b) + 0.5)
    return learner


def random_batch(cfg: MAMLConfig, tasks: int, *, dtype=torch.float64, seed: int = 0, device="cpu") -> TaskBatch:
    """B tasks of Gaussian images; labels 0..N-1 in a different shuffled order per task."""
    generator = torch.Generator().manual_seed(seed)

    def split(per_class):
        x = torch.randn(tasks, cfg.n_way * per_class, cfg.image_channels, cfg.image_size, cfg.image_size,
                        generator=generator, dtype=dtype)
        y = torch.stack([torch.randperm(cfg.n_way, generator=generator).repeat_interleave(per_class)
                         for _ in range(tasks)])
        return x.to(device), y.to(device)

    return TaskBatch(*split(cfg.k_shot), *split(cfg.k_query))


def with_backend(learner: MAMLPlusPlus, backend: str) -> MAMLPlusPlus:
    """An independent copy of ``learner`` that runs on ``backend``."""
    clone = copy.deepcopy(learner)
    clone.cfg = learner.cfg.replace(backend=backend)
    return clone


def compare_meta_iteration(backend: str, device: torch.device, dtype: torch.dtype) -> list[Comparison]:
    """The meta-loss and meta-gradients of one meta-iteration on ``backend`` in ``dtype``, against
    the torch backend's in float64 from the same (rounded) parameters and meta-batch; none in a
    dtype without ``LEARNER_TOLERANCES``."""
    if dtype not in LEARNER_TOLERANCES:
        return []
    tolerance, floor = LEARNER_TOLERANCES[dtype]
    errors, absolute = meta_iteration_errors(backend, device, dtype, floor)
    worst = max(errors, key=errors.get)
    described = f"{tolerance:.0e} relative, floor {floor:.0e}"
    if math.isinf(errors[worst]):
        return [Comparison("meta-iteration", "second order", dtype_name(dtype), None, None, described, False,
                           worst=worst)]
    return [Comparison("meta-iteration", "second order", dtype_name(dtype), absolute, errors[worst], described,
                       errors[worst] <= tolerance, worst=worst)]


def meta_iteration_errors(backend: str, device: torch.device, dtype: torch.dtype,
                          floor: float) -> tuple[dict[str, float], float]:
    """Each of the meta-loss's and meta-gradients' errors relative to the torch backend's in float64
    (``relative_errors`` with ``floor``; infinity where not finite), and the largest absolute error."""
    cfg = MAMLConfig.preset("omniglot-5w1s", **CHECK_CONFIG)
    learner = perturbed_learner(cfg, dtype=dtype).to(device)
    batch = random_batch(cfg, cfg.meta_batch_size, dtype=dtype, device=device)
    checked, expected = ({"meta-loss": out.loss.detach(), **{f"meta-gradient of {name}": p.grad
                                                            for name, p in clone.named_parameters()}}
                         for clone, out in (_meta_iteration(learner, batch, name, run_dtype)
                                            for name, run_dtype in ((backend, dtype), ("torch", torch.float64))))
    errors = {name: error if math.isfinite(error) else math.inf
              for name, error in relative_errors(expected, checked, floor).items()}
    return errors, max((checked[name].to(e) - e).abs().max().item() for name, e in expected.items())


def _meta_iteration(learner: MAMLPlusPlus, batch: TaskBatch, backend: str, dtype: torch.dtype):
    """A copy of ``learner`` in ``dtype`` on ``backend`` after one meta-iteration on ``batch``, and its output."""
    clone = with_backend(learner, backend).to(dtype)
    out = clone(TaskBatch(*(t.to(dtype) if t.is_floating_point() else t for t in batch.tensors())), epoch=0)
    out.loss.backward()
    return clone, out


self_check.add_check("meta-iteration", compare_meta_iteration)
