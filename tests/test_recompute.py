"""Recomputation of the inner steps in the outer backward (``MAMLConfig.recompute``): the same
meta-loss, meta-gradients and running statistics as without it, bitwise; each region run again
exactly once; the graph keeping the tensors of the last inner step only; and the "auto" decision."""

import logging

import pytest
import torch

import mamlfast
from conftest import (DEVICE, device_of, meta_iteration, perturbed_learner, random_batch, relative_errors, usable,
                      with_backend)
from mamlfast import checkpoints, ops, recompute
from mamlfast.cli import build_parser
from mamlfast.learner import MAMLPlusPlus
from mamlfast.learner_check import LEARNER_TOLERANCES
from mamlfast.step import MetaStep, make_optimizer

CASES = {
    # name: (preset, variant, overrides, epoch)
    "maml++ second order with MSL": ("omniglot-5w1s", "maml++", dict(first_order_epochs=0), 3),
    "maml++ second order after MSL": ("omniglot-5w5s", "maml++", {}, 60),
    "maml, shared BN weights and statistics": ("omniglot-5w1s", "maml", {}, 7),
    "mini-imagenet odd sizes": ("mini-imagenet-5w1s", "maml++", dict(image_size=21, k_query=3), 70),
    "one inner step": ("omniglot-5w1s", "maml++", dict(inner_steps=1, eval_inner_steps=1, first_order_epochs=0), 0),
}


def _cfg(case, **changes):
    preset, variant, overrides, epoch = CASES[case]
    overrides = dict(dict(num_filters=4, image_size=16, inner_steps=3, eval_inner_steps=3), **overrides, **changes)
    return mamlfast.MAMLConfig.preset(preset, variant, **overrides), epoch


def _recomputing(learner, recompute=True):
    clone = with_backend(learner, learner.cfg.backend)
    clone.cfg = clone.cfg.replace(recompute=recompute)
    return clone


@pytest.fixture
def reproducible():
    """Kernels that add in a fixed order: with several CPU threads, the torch backend's LSLR
    gradient (an indexed accumulation) otherwise differs in the last bit from run to run, with
    or without recompute."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


class _Forwards:
    """Counts the backbone's forwards (support and query), split at the outer backward."""

    def __init__(self, monkeypatch):
        self.calls = []
        forward = MAMLPlusPlus._logits

        def counted(learner, *args, **kwargs):
            self.calls.append(args[2])  # the step
            return forward(learner, *args, **kwargs)
        monkeypatch.setattr(MAMLPlusPlus, "_logits", counted)


def _assert_bitwise(actual, expected):
    (out, grads, buffers), (plain_out, plain_grads, plain_buffers) = actual, expected
    assert torch.equal(out.loss, plain_out.loss)
    assert torch.equal(out.accuracy, plain_out.accuracy)
    assert torch.equal(out.per_step_losses.nan_to_num(-1), plain_out.per_step_losses.nan_to_num(-1))
    for name, expected_grad in plain_grads.items():
        assert torch.equal(grads[name], expected_grad), f"meta-gradient of {name} differs"
    # the reruns leave the running statistics alone: they moved once, as without recompute
    for name, expected_buffer in plain_buffers.items():
        assert torch.equal(buffers[name], expected_buffer), f"{name} differs"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_recompute_is_bitwise_the_path_without_it(case, dtype, monkeypatch, reproducible):
    cfg, epoch = _cfg(case, backend="torch")
    learner = perturbed_learner(cfg, dtype=dtype)
    plain, recomputing = with_backend(learner, "torch"), _recomputing(learner)
    batch = random_batch(cfg, 2, dtype=dtype)
    forwards = _Forwards(monkeypatch)
    expected = meta_iteration(plain, batch, epoch)
    plain_calls = list(forwards.calls)
    forwards.calls.clear()

    out = recomputing(batch, epoch)
    assert forwards.calls == plain_calls
    out.loss.backward()
    # every support and query forward runs once more, in the outer backward, but the last step's
    # where there are several
    last = cfg.inner_steps - 1
    reruns = forwards.calls[len(plain_calls):]
    assert sorted(reruns) == [step for step in plain_calls if step < last or last == 0]
    grads = {name: p.grad for name, p in recomputing.named_parameters()}
    buffers = {name: b for name, b in recomputing.named_buffers() if "running" in name}
    _assert_bitwise((out, grads, buffers), expected)


@pytest.fixture(params=ops.OP_BACKENDS)
def op_backend(request):
    reason = ops.availability(torch.device(DEVICE))[request.param]
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.mark.parametrize("variant, dtype", [("maml", torch.float64), ("maml++", torch.float32)],
                         ids=["maml-float64", "maml++-float32"])
def test_recompute_on_every_backend_matches_the_reference(op_backend, variant, dtype, request):
    """Through each backend's fused batch norm, its double backward included: within the fused
    backends' float32 tolerance of the reference, and on the CPU bitwise the same backend without
    recompute (plain MAML's shared BN weights get two gradient terms per step from a fused batch
    norm: they must be summed in the same order). Tiny shapes for Triton's interpreter."""
    if DEVICE == "cpu":
        request.getfixturevalue("reproducible")
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", variant, image_size=8, num_filters=3, num_stages=2,
                                     inner_steps=2, eval_inner_steps=2, first_order_epochs=0)
    learner = perturbed_learner(cfg, dtype=dtype).to(DEVICE)
    batch = random_batch(cfg, 2, dtype=dtype, device=DEVICE)
    tolerance, floor = LEARNER_TOLERANCES[dtype]
    ref_out, ref_grads, ref_buffers = meta_iteration(with_backend(learner, "loop"), batch, 1)
    plain = meta_iteration(with_backend(learner, op_backend), batch, 1)
    out, grads, buffers = meta_iteration(_recomputing(with_backend(learner, op_backend)), batch, 1)
    assert abs(out.loss.item() - ref_out.loss.item()) <= tolerance * abs(ref_out.loss.item())
    worst = max(relative_errors(ref_grads, grads, floor=floor).items(), key=lambda item: item[1])
    assert worst[1] <= tolerance, f"meta-gradient of {worst[0]} differs by {worst[1]:.2e} relative"
    for name, expected in ref_buffers.items():
        torch.testing.assert_close(buffers[name], expected, rtol=tolerance, atol=1e-6, msg=name)
    if DEVICE == "cpu":  # GPU kernels may add in another order on every run (atomics)
        _assert_bitwise((out, grads, buffers), plain)


def test_the_graph_keeps_only_the_last_step_and_a_second_backward_recomputes_again(small_cfg, reproducible):
    cfg, epoch = small_cfg.replace(backend="torch"), 60

    def saved_bytes(learner, steps):
        batch = random_batch(learner.cfg, 2, dtype=torch.float32)
        weights = [0.0] * (steps - 1) + [1.0]
        return recompute.saved_bytes(lambda: learner.meta_forward(batch, weights, (steps - 1,), True))

    one_step = perturbed_learner(cfg.replace(inner_steps=1, eval_inner_steps=1), dtype=torch.float32)
    learner = perturbed_learner(cfg, dtype=torch.float32)
    kept = saved_bytes(_recomputing(learner), cfg.inner_steps)
    assert kept == saved_bytes(one_step, 1)
    assert kept < 0.5 * saved_bytes(learner, cfg.inner_steps)

    batch = random_batch(cfg, 2, dtype=torch.float32)
    recomputing = _recomputing(learner)
    out = recomputing(batch, epoch)
    first = torch.autograd.grad(out.loss, list(recomputing.parameters()), retain_graph=True)
    second = torch.autograd.grad(out.loss, list(recomputing.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_captured_recomputing_steps_equal_eager_steps_without_recompute(small_cfg, backend):
    """Recomputation inside a CUDA-graph capture: nothing in it may wait on the host."""
    cfg = small_cfg.replace(backend=backend, first_order_epochs=0, msl_epochs=1, grad_clip=5.0)
    device = torch.device(DEVICE)
    batches = [random_batch(cfg, 3, dtype=torch.float32, seed=i, device=DEVICE) for i in range(6)]
    runs = []
    for recompute_on, graphs in ((False, False), (True, True)):
        run_cfg = cfg.replace(recompute=recompute_on, cuda_graphs=graphs)
        learner = perturbed_learner(run_cfg, dtype=torch.float32).to(device)
        step = MetaStep(learner, make_optimizer(learner, run_cfg, device), run_cfg, device)
        losses = [step(batch, epoch).loss.item() for batch, epoch in zip(batches, [0] * 3 + [1] * 3)]
        runs.append((learner, losses, step))
    (eager, eager_losses, _), (captured, captured_losses, step) = runs
    assert step.graphs and step.graph is not None
    assert captured_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, p), q in zip(captured.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(captured.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


def test_first_order_iterations_do_not_recompute(small_cfg, monkeypatch):
    cfg = small_cfg.replace(backend="torch")
    learner = _recomputing(perturbed_learner(cfg, dtype=torch.float32))
    forwards = _Forwards(monkeypatch)
    learner(random_batch(cfg, 2, dtype=torch.float32), epoch=0).loss.backward()  # first-order phase of DA
    assert len(forwards.calls) == cfg.inner_steps + cfg.inner_steps  # support and (MSL) query forwards


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_the_estimate_counts_what_the_graph_saves(small_cfg, backend):
    """The dry run on the meta device saves exactly the tensors a real run of the backend saves
    (Triton's traced as the extension's, whose autograd Functions it shares)."""
    device = device_of(usable(backend))
    learner = perturbed_learner(small_cfg.replace(backend=backend), dtype=torch.float32).to(device)
    batch = random_batch(small_cfg, 2, dtype=torch.float32, device=device)
    steps = (0, 1, 2)
    real = recompute.saved_bytes(lambda: learner.meta_forward(batch, [1.0] * 3, steps, True))
    assert learner.second_order_bytes(batch, steps) == real
    double = random_batch(small_cfg, 4, dtype=torch.float32, device=device)
    assert learner.second_order_bytes(double, steps) > 1.9 * real


@pytest.mark.parametrize("free, expected", [(1, True), (2**50, False), (None, False)])
def test_auto_recomputes_where_the_estimate_exceeds_free_memory(small_cfg, monkeypatch, caplog, free, expected):
    cfg = small_cfg.replace(backend="torch", recompute="auto", first_order_epochs=0)
    learner = perturbed_learner(cfg, dtype=torch.float32)
    monkeypatch.setattr(recompute, "free_bytes", lambda device: free)
    regions = []
    monkeypatch.setattr(recompute, "recomputed", lambda fn, rerun_context: regions.append(fn) or fn)
    with caplog.at_level(logging.INFO, logger="mamlfast.learner"):
        for seed in range(2):
            learner(random_batch(cfg, 2, dtype=torch.float32, seed=seed), epoch=1)
    assert bool(regions) == expected
    decisions = [r.message for r in caplog.records if "recompute='auto'" in r.message]
    assert len(decisions) == 1  # decided once per shape of batch
    assert ("recomputation on" if expected else "recomputation off") in decisions[0]
    assert ("unknown" in decisions[0]) == (free is None)


def test_auto_decides_again_for_another_shape(small_cfg, monkeypatch, caplog):
    cfg = small_cfg.replace(backend="torch", recompute="auto", first_order_epochs=0)
    learner = perturbed_learner(cfg, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="mamlfast.learner"):
        for tasks in (2, 2, 1):
            learner(random_batch(cfg, tasks, dtype=torch.float32), epoch=1)
    assert sum("recompute='auto'" in r.message for r in caplog.records) == 2


def test_free_memory_is_known_on_this_machine():
    free = recompute.free_bytes(torch.device(DEVICE))
    assert free is None or free > 0


def test_the_reference_path_ignores_recompute_and_says_so(small_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="mamlfast.learner"):
        learner = MAMLPlusPlus(small_cfg.replace(backend="loop", recompute=True))
    assert "recompute=True is ignored with backend='loop'" in caplog.text
    assert learner(random_batch(small_cfg, 1, dtype=torch.float32), epoch=60).loss.requires_grad


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_config_values(value):
    assert mamlfast.MAMLConfig(recompute=value).recompute == value


@pytest.mark.parametrize("value", ["yes", 1, None, "Auto"])
def test_bad_config_values_name_the_field(value):
    with pytest.raises(ValueError, match=r"MAMLConfig\.recompute=.*must be False, True or 'auto'"):
        mamlfast.MAMLConfig(recompute=value)


@pytest.mark.parametrize("argv, value", [([], None), (["--recompute"], True), (["--recompute", "auto"], "auto"),
                                         (["--no-recompute"], False), (["--recompute", "--seed", "3"], True)])
def test_command_line(argv, value):
    assert build_parser().parse_args(["train", *argv]).recompute == value


def test_a_run_may_resume_with_recompute_switched(small_cfg, tmp_path):
    payload = dict(config=small_cfg.to_dict())
    checkpoints.check_same_run(payload, small_cfg.replace(recompute="auto"), tmp_path / "latest.pt")
