"""The task-batched path against the per-task reference: meta-loss, every meta-gradient,
running statistics and predictions, in float64, for each MAML variant and phase."""

import pytest
import torch

import mamlfast
from conftest import meta_iteration, perturbed_learner, random_batch, relative_errors, with_backend
from mamlfast.learner_check import LEARNER_TOLERANCES

TOLERANCE = LEARNER_TOLERANCES[torch.float64][0]

CASES = {
    # name: (preset, variant, overrides, epoch)
    "maml++ second order with MSL": ("omniglot-5w1s", "maml++", dict(first_order_epochs=0), 3),
    "maml++ first-order DA phase with MSL": ("omniglot-5w1s", "maml++", {}, 4),
    "maml++ second order after MSL": ("omniglot-5w5s", "maml++", {}, 60),
    "maml": ("omniglot-5w1s", "maml", {}, 7),
    "fomaml": ("omniglot-5w1s", "fomaml", {}, 7),
    "20-way": ("omniglot-20w1s", "maml++", dict(first_order_epochs=0, k_query=2), 2),
    "mini-imagenet odd sizes": ("mini-imagenet-5w1s", "maml++", dict(image_size=21, k_query=3), 70),
    "one inner step, one task": ("omniglot-5w1s", "maml++", dict(inner_steps=1, eval_inner_steps=1,
                                                               first_order_epochs=0), 0),
    "shared BN statistics, running-stat evaluation": (
        "omniglot-5w1s", "maml++", dict(per_step_bn_stats=False, bn_eval="running"), 60),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_path_matches_reference(case):
    preset, variant, overrides, epoch = CASES[case]
    overrides = dict(dict(num_filters=8, image_size=16, inner_steps=3, eval_inner_steps=3), **overrides)
    cfg = mamlfast.MAMLConfig.preset(preset, variant, **overrides)
    tasks = 1 if case == "one inner step, one task" else 3
    learner = perturbed_learner(cfg)
    batch = random_batch(cfg, tasks)

    ref_out, ref_grads, ref_buffers = meta_iteration(with_backend(learner, "loop"), batch, epoch)
    out, grads, buffers = meta_iteration(with_backend(learner, "torch"), batch, epoch)

    assert ref_out.loss.requires_grad and out.loss.requires_grad
    assert abs(out.loss.item() - ref_out.loss.item()) <= TOLERANCE * abs(ref_out.loss.item())
    assert out.accuracy.item() == pytest.approx(ref_out.accuracy.item())
    torch.testing.assert_close(out.per_step_losses, ref_out.per_step_losses, rtol=TOLERANCE, atol=0,
                               equal_nan=True)
    assert set(grads) == set(ref_grads)
    worst = max(relative_errors(ref_grads, grads).items(), key=lambda item: item[1])
    assert worst[1] <= TOLERANCE, f"meta-gradient of {worst[0]} differs by {worst[1]:.2e} relative"
    for name, expected in ref_buffers.items():
        torch.testing.assert_close(buffers[name], expected, rtol=TOLERANCE, atol=1e-12, msg=name)

    ref_logits = with_backend(learner, "loop").predict(batch.x_support, batch.y_support, batch.x_query)
    logits = with_backend(learner, "torch").predict(batch.x_support, batch.y_support, batch.x_query)
    torch.testing.assert_close(logits, ref_logits, rtol=TOLERANCE, atol=1e-9)


def test_second_order_gradient_differs_from_first_order(small_cfg):
    """The derivative order is live: the same batch gives different meta-gradients in each."""
    learner = perturbed_learner(small_cfg.replace(msl=False))
    batch = random_batch(small_cfg, 2)
    first = meta_iteration(with_backend(learner, "torch"), batch, epoch=0)[1]
    second = meta_iteration(with_backend(learner, "torch"), batch, epoch=small_cfg.first_order_epochs)[1]
    assert (first["net.conv1.weight"] - second["net.conv1.weight"]).abs().max() > 1e-6
