"""MAMLPlusPlus behaviour: names, running statistics, evaluation modes, and bad input."""

import pytest
import torch
import torch.nn.functional as F

import mamlfast
from conftest import perturbed_learner, random_batch, with_backend

BACKENDS = ["loop", "torch"]


def test_state_dict_names_and_shapes(small_cfg):
    state = mamlfast.MAMLPlusPlus(small_cfg).state_dict()
    S, C = small_cfg.inner_steps, small_cfg.num_filters
    for i in range(4):
        assert state[f"net.conv{i}.weight"].shape[0] == C and state[f"net.conv{i}.bias"].shape == (C,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert state[f"net.norm{i}.{name}"].shape == (S, C)
        assert state[f"inner_lrs.conv{i}_weight"].shape == (S,) and f"inner_lrs.conv{i}_bias" in state
    assert state["net.head.weight"].shape == (small_cfg.n_way, C) and state["net.head.bias"].shape == (5,)
    assert state["inner_lrs.head_weight"].tolist() == pytest.approx([small_cfg.inner_lr] * S)
    plain = mamlfast.MAMLPlusPlus(small_cfg.replace(per_step_bn_weights=False, per_step_bn_stats=False,
                                                    learn_inner_lrs=False))
    assert plain.state_dict()["net.norm0.weight"].shape == (C,)
    assert plain.state_dict()["net.norm0.running_var"].shape == (C,)
    assert "inner_lrs.conv0_weight" in plain.state_dict()
    assert not any(name.startswith("inner_lrs") for name, _ in plain.named_parameters())


def test_initialisation(small_cfg):
    net = mamlfast.MAMLPlusPlus(small_cfg).net
    assert torch.all(net.conv1.bias == 0) and torch.all(net.head.bias == 0)
    assert torch.all(net.norm2.weight == 1) and torch.all(net.norm2.bias == 0)
    fan_in, fan_out = 6 * 9, 6 * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert net.conv1.weight.abs().max() <= bound and net.conv1.weight.abs().max() > bound * 0.8


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_land_in_the_row_of_their_step(small_cfg, backend):
    """After MSL ends, step s's row moves only by the support forward at step s (and the last
    row also by the query forward). Row 0 is predictable by hand: its input is conv0 of the
    support images with the initial weights."""
    cfg = small_cfg.replace(backend=backend)
    learner = perturbed_learner(cfg)
    batch = random_batch(cfg, 3)
    before = learner.net.norm0.running_mean.clone(), learner.net.norm0.running_var.clone()
    learner(batch, epoch=cfg.msl_epochs)
    after = learner.net.norm0.running_mean, learner.net.norm0.running_var

    conv = F.conv2d(batch.x_support.flatten(0, 1), learner.net.conv0.weight, learner.net.conv0.bias, padding=1)
    conv = conv.view(3, -1, *conv.shape[1:]).transpose(1, 2).flatten(2)  # [B, C, N*H*W]
    momentum = learner.net.norm0.momentum
    torch.testing.assert_close(after[0][0], torch.lerp(before[0][0], conv.mean(-1).mean(0), momentum))
    torch.testing.assert_close(after[1][0], torch.lerp(before[1][0], conv.var(-1).mean(0), momentum))
    assert torch.all(after[0] != before[0])

    learner.eval()
    frozen = [b.clone() for b in learner.buffers()]
    learner(batch, epoch=0)
    learner.predict(batch.x_support, batch.y_support, batch.x_query)
    assert all(torch.equal(a, b) for a, b in zip(frozen, learner.buffers()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_eval_modes(small_cfg, backend):
    """"batch" normalises the query with its own statistics, so a query sample's logits depend
    on the others; "running" uses the per-step running statistics and classifies each alone."""
    batch = random_batch(small_cfg, 2, seed=3)
    one = slice(0, 1)
    for mode, transductive in (("batch", True), ("running", False)):
        learner = perturbed_learner(small_cfg.replace(backend=backend, bn_eval=mode))
        together = learner.predict(batch.x_support, batch.y_support, batch.x_query)
        alone = learner.predict(batch.x_support, batch.y_support, batch.x_query[:, one])
        assert together.shape == (2, small_cfg.n_way * small_cfg.k_query, small_cfg.n_way)
        assert torch.allclose(together[:, one], alone) != transductive, mode


def test_predict_runs_more_steps_with_fixed_rates_and_shared_norms():
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", "maml", image_size=16, num_filters=4,
                                     inner_steps=2, eval_inner_steps=4)
    learner = perturbed_learner(cfg)
    batch = random_batch(cfg, 2)
    logits = {backend: with_backend(learner, backend).predict(batch.x_support, batch.y_support, batch.x_query)
              for backend in BACKENDS}
    torch.testing.assert_close(logits["torch"], logits["loop"])
    fewer = with_backend(learner, "torch")
    fewer.cfg = fewer.cfg.replace(eval_inner_steps=2)
    assert not torch.allclose(fewer.predict(batch.x_support, batch.y_support, batch.x_query), logits["torch"])


def test_training_reduces_the_meta_loss(small_cfg):
    """A few Adam steps on one fixed batch: the meta-loss falls and every meta-parameter moves."""
    learner = mamlfast.MAMLPlusPlus(small_cfg.replace(backend="torch"))
    batch = random_batch(small_cfg, 2, dtype=torch.float32)
    start = {name: p.detach().clone() for name, p in learner.named_parameters()}
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        out = learner(batch, epoch=0)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    moved = {name for name, p in learner.named_parameters() if not torch.equal(p, start[name])}
    # conv biases feed batch norm: their gradients, and their rates', are zero up to rounding
    zero_gradient = {f"{prefix}conv{i}{suffix}" for i in range(4)
                     for prefix, suffix in (("net.", ".bias"), ("inner_lrs.", "_bias"))}
    assert set(start) - zero_gradient <= moved


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_value_error_that_names_the_problem(small_cfg, backend):
    learner = mamlfast.MAMLPlusPlus(small_cfg.replace(backend=backend))
    good = random_batch(small_cfg, 2, dtype=torch.float32)

    def batch(**changes):
        fields = dict(x_support=good.x_support, y_support=good.y_support, x_query=good.x_query, y_query=good.y_query)
        return mamlfast.TaskBatch(**{**fields, **changes})

    nan_images = good.x_query.clone()
    nan_images[1, 0, 0, 0, 0] = float("nan")
    cases = [
        (batch(x_support=good.x_support[0]), r"x_support must be \[B, samples, 1, 16, 16\]"),
        (batch(x_query=good.x_query[..., :8]), r"x_query must be \[B, samples, 1, 16, 16\]"),
        (batch(y_support=good.y_support[:, :2]), r"y_support must be \[B, samples\]"),
        (batch(y_query=good.y_query + small_cfg.n_way), r"y_query holds labels outside \[0, n_way=5\)"),
        (batch(y_support=good.y_support - 1), r"y_support holds labels outside"),
        (batch(x_query=good.x_query[:1], y_query=good.y_query[:1]), "different numbers of tasks: 2 and 1"),
        (batch(x_query=nan_images), "x_query holds non-finite values"),
        (batch(y_query=good.y_query.float()), "y_query must hold int64 class labels"),
        (batch(x_support=good.x_support.long()), "x_support must be a floating-point tensor"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            learner(bad, epoch=0)
    with pytest.raises(ValueError, match="x_support holds non-finite"):
        learner.predict(good.x_support * float("inf"), good.y_support, good.x_query)
