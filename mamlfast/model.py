"""The paper's backbone: its parameters, and its forward for all tasks of a meta-batch at once.

Four stages of conv3x3 -> per-step batch norm -> leaky ReLU -> 2x2 max-pool, then a linear
head. The conv and head weights and biases are adapted per task in the inner loop; during
adaptation they live in one flat buffer [B, P] (B tasks, P adapted values per task) so that
the inner gradient is one tensor and the LSLR update is one op over every layer and task.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import MAMLConfig

LEAKY_RELU_SLOPE = 0.01


class PerStepBatchNorm(nn.Module):
    """Batch-norm weights, biases and running statistics, one row per inner step (BNWB, BNRS).

    Without per-step weights (or statistics) there is one shared [C] tensor instead of [S, C].
    """

    def __init__(self, channels: int, steps: int, per_step_weights: bool, per_step_stats: bool,
                 momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        weight_shape = (steps, channels) if per_step_weights else (channels,)
        stats_shape = (steps, channels) if per_step_stats else (channels,)
        self.weight = nn.Parameter(torch.ones(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape))
        self.register_buffer("running_mean", torch.zeros(stats_shape))
        self.register_buffer("running_var", torch.ones(stats_shape))
        self.momentum = momentum
        self.eps = eps

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, bias, running_mean, running_var), each [C], used at inner step ``step``.

        The running statistics are views, so updating them in place updates this step's row.
        """
        def row(t: torch.Tensor) -> torch.Tensor:
            return t[step] if t.dim() == 2 else t
        return row(self.weight), row(self.bias), row(self.running_mean), row(self.running_var)


class Backbone(nn.Module):
    """Parameters ``conv{i}``, ``norm{i}`` and ``head`` of the paper's convolutional network."""

    def __init__(self, cfg: MAMLConfig):
        super().__init__()
        self.num_stages = cfg.num_stages
        channels, size = cfg.image_channels, cfg.image_size
        for i in range(cfg.num_stages):
            conv = nn.Conv2d(channels, cfg.num_filters, kernel_size=3, padding=1)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"norm{i}", PerStepBatchNorm(
                cfg.num_filters, cfg.inner_steps, cfg.per_step_bn_weights, cfg.per_step_bn_stats))
            channels, size = cfg.num_filters, size // 2
        self.head = nn.Linear(channels * size * size, cfg.n_way)
        for layer in self.adapted_layers():
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.running_stats_holds = 0

    def hold_running_stats(self) -> "HeldRunningStats":
        """A context (reusable) in which forwards leave the running statistics as they are."""
        return HeldRunningStats(self)

    def adapted_layers(self) -> list[nn.Module]:
        return [getattr(self, f"conv{i}") for i in range(self.num_stages)] + [self.head]

    def norms(self) -> list[PerStepBatchNorm]:
        return [getattr(self, f"norm{i}") for i in range(self.num_stages)]

    def adapted_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters adapted in the inner loop, in flat-buffer order: ``conv0_weight``, ..."""
        return {f"{name}_{kind}": getattr(layer, kind)
                for name, layer in zip(self.adapted_names(), self.adapted_layers())
                for kind in ("weight", "bias")}

    def adapted_names(self) -> list[str]:
        return [f"conv{i}" for i in range(self.num_stages)] + ["head"]

    def flat_parameters(self, tasks: int) -> torch.Tensor:
        """The initial adapted parameters, flattened and repeated for each task: [B, P]."""
        flat = torch.cat([p.reshape(-1) for p in self.adapted_parameters().values()])
        return flat.expand(tasks, -1).contiguous()

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """[B, P] -> views [B, *shape] of each adapted parameter, in flat-buffer order."""
        shapes = [p.shape for p in self.adapted_parameters().values()]
        # One split rather than a slice per tensor: its backward writes the [B, P] gradient in one
        # pass, where each slice's backward would fill a zero [B, P] buffer to be added to the others.
        chunks = flat.split([shape.numel() for shape in shapes], dim=1)
        return [chunk.view(flat.shape[0], *shape) for chunk, shape in zip(chunks, shapes)]

    def forward_tasks(
        self,
        flat: torch.Tensor,
        x: torch.Tensor,
        step: int,
        *,
        use_running_stats: bool,
        track_running_stats: bool,
        backend: str,
    ) -> torch.Tensor:
        """Logits [B, M, n_way] of B tasks with their own parameters ``flat`` [B, P].

        ``x`` is [M, B*C, H, W], the M images of each task with tasks folded into channels.
        Batch norm uses inner step ``step``'s weights and statistics.
        """
        tasks = flat.shape[0]
        params = self.unflatten(flat)
        for i, norm in enumerate(self.norms()):
            weight, bias = params[2 * i], params[2 * i + 1]
            # [B, F, C_in, 3, 3] -> [B*F, C_in, 3, 3]: one grouped convolution for all tasks
            x = ops.grouped_conv2d(x, weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1),
                                   padding=1, groups=tasks, backend=backend)
            gamma, beta, running_mean, running_var = norm.at(step)
            keep_stats = use_running_stats or track_running_stats
            if track_running_stats and self.running_stats_holds:
                running_mean, running_var = running_mean.clone(), running_var.clone()
            x = ops.task_batch_norm(
                x, gamma, beta,
                running_mean if keep_stats else None, running_var if keep_stats else None,
                training=not use_running_stats, momentum=norm.momentum, eps=norm.eps, backend=backend)
            # Pooling first gives the same values and gradients (the leaky ReLU is increasing, so it commutes
            # with a max) for a quarter of the ReLU's work and one full-size activation fewer kept for backward.
            x = F.leaky_relu(ops.max_pool2x2(x, backend=backend), LEAKY_RELU_SLOPE)
        head_weight, head_bias = params[-2], params[-1]
        # [M, B*F, h, w] -> [B, M, F*h*w]
        features = x.reshape(x.shape[0], tasks, -1).transpose(0, 1)
        # [B, M, D] @ [B, D, n_way] + [B, 1, n_way]
        return torch.baddbmm(head_bias.unsqueeze(1), features, head_weight.transpose(1, 2))


class HeldRunningStats:
    """While entered, batch norm moves copies of a backbone's running statistics, not them.

    The forward runs the same operations as outside, so a forward recomputed for the backward
    pass gives the same values, but it does not move the statistics a second time.
    """

    def __init__(self, net: Backbone):
        self.net = net

    def __enter__(self) -> None:
        self.net.running_stats_holds += 1

    def __exit__(self, *exc_info) -> None:
        self.net.running_stats_holds -= 1


class InnerLearningRates(nn.Module):
    """LSLR: one inner learning rate per adapted tensor and per step, each [S].

    Learned rates are parameters; fixed ones (plain MAML) are buffers with the same names.
    """

    def __init__(self, names: list[str], steps: int, init: float, learnable: bool):
        super().__init__()
        self.names = list(names)
        for name in self.names:
            rates = torch.full((steps,), float(init))
            if learnable:
                self.register_parameter(name, nn.Parameter(rates))
            else:
                self.register_buffer(name, rates)

    def stacked(self) -> torch.Tensor:
        """[T, S]: the rates of all T tensors, rows in flat-buffer order."""
        return torch.stack([getattr(self, name) for name in self.names])

    def step_column(self, step: int) -> int:
        """The column of step ``step``; fixed rates let evaluation run more steps than training."""
        return min(step, getattr(self, self.names[0]).shape[0] - 1)


def fold_tasks(x: torch.Tensor) -> torch.Tensor:
    """[B, M, C, H, W] -> [M, B*C, H, W]: the layout of a grouped convolution over tasks."""
    tasks, samples = x.shape[:2]
    return x.transpose(0, 1).reshape(samples, tasks * x.shape[2], *x.shape[3:])
