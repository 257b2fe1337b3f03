"""A meta-batch of few-shot tasks, what a meta-forward returns, and the checks on both."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MAMLConfig


@dataclass
class TaskBatch:
    """B tasks: support images [B, N*K, C, H, W] and labels [B, N*K] in [0, N); query likewise."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x_support, self.y_support, self.x_query, self.y_query

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TaskBatch":
        return TaskBatch(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()))

    def check(self, cfg: MAMLConfig, parameter: torch.Tensor | None = None) -> None:
        """Raise ``ValueError`` naming the problem if this batch does not fit ``cfg`` (and a model
        whose ``parameter`` shows its dtype and device)."""
        check_tasks(cfg, self.x_support, self.y_support, self.x_query, self.y_query, parameter)


@dataclass
class MetaOutput:
    """Result of a meta-forward over a batch of tasks.

    ``loss``: the meta-loss, mean over tasks, differentiable w.r.t. every meta-parameter.
    ``accuracy``: query accuracy after the last inner step, mean over tasks (detached).
    ``per_step_losses`` [S]: query loss after each inner step, mean over tasks (detached);
    NaN for the steps whose loss has weight zero in the meta-loss, which are not computed.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    per_step_losses: torch.Tensor


def check_tasks(cfg: MAMLConfig, x_support: torch.Tensor, y_support: torch.Tensor,
                x_query: torch.Tensor, y_query: torch.Tensor | None = None,
                parameter: torch.Tensor | None = None) -> None:
    """Shapes, dtypes, devices, label range and finiteness of a batch of tasks; ``y_query`` may be
    absent. Images must have the dtype of the model that ``parameter`` belongs to (no silent casts),
    and everything must be on its device."""
    image_shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
    images = [("x_support", x_support), ("x_query", x_query)]
    for name, x in images:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or tuple(x.shape[2:]) != image_shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [B, samples, {', '.join(map(str, image_shape))}], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if parameter is not None and x.dtype != parameter.dtype:
            raise ValueError(f"{name} is {x.dtype} but the model's parameters are {parameter.dtype}: "
                             f"convert one to the other (x.to({parameter.dtype}) or learner.to({x.dtype}))")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} holds no tasks or no samples: shape {tuple(x.shape)}")
    if x_query.shape[0] != x_support.shape[0]:
        raise ValueError(f"support and query hold different numbers of tasks: "
                         f"{x_support.shape[0]} and {x_query.shape[0]}")
    labels = [("y_support", y_support, x_support)]
    if y_query is not None:
        labels.append(("y_query", y_query, x_query))
    for name, y, x in labels:
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape[:2]):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{name} must be [B, samples]={tuple(x.shape[:2])}, got {shape}")
        if y.dtype != torch.int64:
            raise ValueError(f"{name} must hold int64 class labels, got {y.dtype}")
    device = parameter.device if parameter is not None else x_support.device
    for name, t in images + [(name, y) for name, y, _ in labels]:
        if t.device != device:
            owner = "the model" if parameter is not None else "x_support"
            raise ValueError(f"{name} is on {t.device} but {owner} is on {device}")
    problems = [(f"{name} holds non-finite values (NaN or inf)", ~torch.isfinite(x).all())
                for name, x in images]
    problems += [(f"{name} holds labels outside [0, n_way={cfg.n_way})", ((y < 0) | (y >= cfg.n_way)).any())
                 for name, y, _ in labels]
    # one host synchronisation for all value checks
    flags = torch.stack([flag for _, flag in problems]).tolist()
    for (message, _), flag in zip(problems, flags):
        if flag:
            raise ValueError(message)
