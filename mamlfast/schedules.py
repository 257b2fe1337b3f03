"""What changes with the epoch: multi-step loss weights, derivative order, meta learning rate."""

from __future__ import annotations

import numbers

import torch

from .config import MAMLConfig


def msl_weights(cfg: MAMLConfig, epoch: int) -> list[float]:
    """Weights v_s of the query losses after each inner step (MSL, paper section 4).

    Before ``msl_epochs`` the earlier steps' weights decay linearly to a floor of 0.03/S and
    the final step's grows to match, so the weights always sum to one; afterwards, or
    without MSL, only the final step counts.
    """
    check_epoch(epoch)
    steps = cfg.inner_steps
    if not cfg.msl or epoch >= cfg.msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = epoch / (steps * cfg.msl_epochs)
    floor = 0.03 / steps
    earlier = [max(1.0 / steps - decay, floor)] * (steps - 1)
    final = min(1.0 / steps + (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return earlier + [final]


def query_steps(weights: list[float]) -> tuple[int, ...]:
    """The inner steps whose query loss enters the meta-loss: those of non-zero weight."""
    return tuple(step for step, weight in enumerate(weights) if weight > 0)


def use_second_order(cfg: MAMLConfig, epoch: int) -> bool:
    """DA: differentiate through the inner gradients once ``first_order_epochs`` have passed."""
    check_epoch(epoch)
    return cfg.second_order and epoch >= cfg.first_order_epochs


def check_epoch(epoch) -> None:
    """Raise ``ValueError`` unless ``epoch`` is a whole number of epochs, 0 or more."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ValueError(f"epoch={epoch!r}: must be a non-negative integer (it sets the multi-step loss weights "
                         f"and the derivative order)")


def total_iterations(cfg: MAMLConfig) -> int:
    return cfg.epochs * cfg.iters_per_epoch


def cosine_meta_lr(optimizer: torch.optim.Optimizer, cfg: MAMLConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """CA: cosine annealing from ``meta_lr`` to ``min_meta_lr`` over the run, stepped per iteration.

    A learning rate held in a device tensor (capturable Adam) is updated in place.
    """
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=total_iterations(cfg), eta_min=cfg.min_meta_lr)
    host_base_rates(scheduler)
    return scheduler


def host_base_rates(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Keep the schedule's arithmetic on the host even where the rate lives on a device."""
    scheduler.base_lrs = [float(lr) for lr in scheduler.base_lrs]
