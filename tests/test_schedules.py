import pytest
import torch

from mamlfast import MAMLConfig
from mamlfast.schedules import cosine_meta_lr, msl_weights, use_second_order

S = 5


@pytest.mark.parametrize("epoch, earlier, final", [
    (0, 0.2, 0.2),
    (5, 0.1, 0.6),
    (9, 0.02, 0.92),
])
def test_msl_weights_during_annealing(epoch, earlier, final):
    weights = msl_weights(MAMLConfig(inner_steps=S, msl_epochs=10), epoch)
    assert weights == pytest.approx([earlier] * (S - 1) + [final])
    assert sum(weights) == pytest.approx(1.0)


def test_msl_weights_floor_cap_and_end():
    cfg = MAMLConfig(inner_steps=S, msl_epochs=10)
    # long annealing reaches the floor 0.03/S and the cap 1 - (S-1)*0.03/S before it ends
    late = msl_weights(cfg.replace(msl_epochs=1000), 999)
    assert late[:-1] == pytest.approx([0.03 / S] * (S - 1))
    assert late[-1] == pytest.approx(1 - (S - 1) * 0.03 / S)
    assert sum(late) == pytest.approx(1.0)
    assert msl_weights(cfg, 10) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert msl_weights(cfg.replace(msl=False), 0) == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_derivative_order_annealing():
    cfg = MAMLConfig(first_order_epochs=50)
    assert not use_second_order(cfg, 0) and not use_second_order(cfg, 49)
    assert use_second_order(cfg, 50) and use_second_order(cfg, 99)
    assert not use_second_order(cfg.replace(second_order=False), 99)


def test_cosine_meta_lr_endpoints():
    cfg = MAMLConfig(epochs=3, iters_per_epoch=4, meta_lr=1e-3, min_meta_lr=1e-5)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.meta_lr)
    scheduler = cosine_meta_lr(optimizer, cfg)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(12):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[6] == pytest.approx((1e-3 + 1e-5) / 2)
    assert lrs[12] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
