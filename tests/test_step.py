"""MetaStep: the eager meta-iteration is the learner's, and a captured one replays it exactly."""

import logging

import pytest
import torch

from conftest import DEVICE, perturbed_learner, random_batch, usable
from mamlfast.step import MetaStep, make_optimizer

gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


def _run(cfg, learner, batches, epochs, device):
    learner = learner.to(device)
    step = MetaStep(learner, make_optimizer(learner, cfg, torch.device(device)), cfg, torch.device(device))
    losses = [step(batch.to(device), epoch).loss.item() for batch, epoch in zip(batches, epochs)]
    return learner, losses, step


def test_eager_step_is_forward_backward_clip_and_adam(small_cfg):
    cfg = small_cfg.replace(backend="torch", grad_clip=0.01)
    learner = perturbed_learner(cfg, dtype=torch.float32)
    batch = random_batch(cfg, 3, dtype=torch.float32)
    expected = perturbed_learner(cfg, dtype=torch.float32)
    optimizer = torch.optim.Adam(expected.parameters(), lr=cfg.meta_lr)
    loss = expected(batch, 2).loss
    loss.backward()
    torch.nn.utils.clip_grad_value_(expected.parameters(), 0.01)
    optimizer.step()

    stepped, losses, _ = _run(cfg, learner, [batch], [2], "cpu")
    assert losses[0] == pytest.approx(loss.item())
    for (name, p), q in zip(stepped.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_graphs_fall_back_to_eager_on_the_cpu_and_say_why(small_cfg, caplog):
    """Graphs asked for on the CPU: every meta-iteration runs eagerly, and the step reports none replayed."""
    batch = random_batch(small_cfg, 2, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="mamlfast.step"):
        _, _, step = _run(small_cfg.replace(cuda_graphs=True), perturbed_learner(small_cfg, dtype=torch.float32),
                          [batch] * 4, [0] * 4, "cpu")
    assert not step.graphs and step.replays == 0 and not step.graph_replayed
    assert step.eager_reason.startswith("CUDA graphs need a CUDA device")
    assert "CUDA graphs need a CUDA device" in caplog.text


def test_graphs_not_asked_for_have_no_reason_to_report(small_cfg):
    _, _, step = _run(small_cfg.replace(cuda_graphs=False), perturbed_learner(small_cfg, dtype=torch.float32),
                      [random_batch(small_cfg, 2, dtype=torch.float32)], [0], "cpu")
    assert step.eager_reason is None and step.replays == 0 and not step.graph_replayed


@gpu
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_captured_steps_equal_eager_steps(small_cfg, backend, monkeypatch):
    """Twelve iterations across both phase switches (MSL ends, second order begins), each phase
    warmed up for two iterations and captured anew: the same losses and parameters as eager.
    With the fused kernels (cuda, triton), which sum in a fixed order, and cuDNN's deterministic
    convolutions, bitwise the same; the torch path's own kernels may add atomically, so it is
    compared to rounding."""
    usable(backend)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = small_cfg.replace(backend=backend, msl_epochs=1, first_order_epochs=2, grad_clip=5.0)
    batches = [random_batch(cfg, 3, dtype=torch.float32, seed=i) for i in range(12)]
    epochs = [0] * 4 + [1] * 4 + [2] * 4
    results = {}
    for graphs in (False, True):
        learner = perturbed_learner(cfg, dtype=torch.float32)
        results[graphs] = _run(cfg.replace(cuda_graphs=graphs), learner, batches, epochs, DEVICE)
    (eager, eager_losses, _), (captured, captured_losses, step) = results[False], results[True]
    assert step.graphs and step.graph is not None and step.eager_reason is None
    assert step.replays == 6 and step.graph_replayed  # per phase: 2 eager warm-ups, the capture's replay, 1 more
    bitwise = backend != "torch"
    assert captured_losses == (eager_losses if bitwise else pytest.approx(eager_losses, rel=1e-5))
    tolerance = dict(rtol=0, atol=0) if bitwise else dict(rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(captured.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, **tolerance, msg=name)
    for (name, b), c in zip(captured.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, **tolerance, msg=name)


@gpu
def test_failed_capture_runs_eagerly_and_reports_it(small_cfg, monkeypatch):
    def failing_capture(*args, **kwargs):
        raise RuntimeError("planted capture failure")

    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    cfg = small_cfg.replace(backend="torch", cuda_graphs=True)
    batches = [random_batch(cfg, 3, dtype=torch.float32, seed=i) for i in range(4)]
    _, losses, step = _run(cfg, perturbed_learner(cfg, dtype=torch.float32), batches, [0] * 4, DEVICE)
    _, eager_losses, _ = _run(cfg.replace(cuda_graphs=False), perturbed_learner(cfg, dtype=torch.float32), batches,
                              [0] * 4, DEVICE)
    assert not step.graphs and step.replays == 0 and not step.graph_replayed
    assert "CUDA graph capture failed" in step.eager_reason and "planted capture failure" in step.eager_reason
    assert losses == pytest.approx(eager_losses, rel=1e-5)


def test_optimizer_state_from_a_gpu_run_resumes_on_the_cpu(small_cfg):
    """A capturable Adam's state (rate and step counters as tensors) loads into a CPU run."""
    from mamlfast.schedules import cosine_meta_lr
    from mamlfast.step import match_optimizer_to_device
    small_cfg = small_cfg.replace(epochs=1, iters_per_epoch=4)
    learner = perturbed_learner(small_cfg, dtype=torch.float32)
    optimizer = make_optimizer(learner, small_cfg, torch.device("cpu"))
    scheduler = cosine_meta_lr(optimizer, small_cfg)
    learner(random_batch(small_cfg, 2, dtype=torch.float32), 0).loss.backward()
    optimizer.step()
    scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    for group in saved_optimizer["param_groups"]:  # as a GPU run saves them
        group.update(capturable=True, lr=torch.tensor(group["lr"]))
    saved_scheduler["base_lrs"] = [torch.tensor(lr) for lr in saved_scheduler["base_lrs"]]

    optimizer = make_optimizer(learner, small_cfg, torch.device("cpu"))
    scheduler = cosine_meta_lr(optimizer, small_cfg)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    match_optimizer_to_device(optimizer, scheduler, torch.device("cpu"))
    assert all(not g["capturable"] and isinstance(g["lr"], float) for g in optimizer.param_groups)
    assert all(isinstance(lr, float) for lr in scheduler.base_lrs)
    learner(random_batch(small_cfg, 2, dtype=torch.float32), 0).loss.backward()
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx((small_cfg.meta_lr + small_cfg.min_meta_lr) / 2)
