"""MAML++ as users write it without mamlfast, with torch.func: the peer every benchmark is measured against.

``functional_call`` runs the network with a task's adapted weights, ``torch.func.grad`` takes
the inner gradients, and ``vmap`` runs the tasks of a meta-batch side by side, as in the
functorch MAML example. Batch norm normalises with the batch's statistics and keeps no
running statistics (``vmap`` cannot update them in place). The rest is MAML++ as mamlfast
computes it: the multi-step loss weights, derivative order, per-step batch-norm weights and
biases, and learned per-layer per-step inner learning rates. Its meta-loss and meta-gradients
equal the reference's (tests/test_benchmarks.py).

Parameter names are mamlfast's, so ``load_learner`` starts both from the same weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from mamlfast import MAMLConfig, MAMLPlusPlus, TaskBatch
from mamlfast.schedules import msl_weights, use_second_order


class PerStepNorm(nn.Module):
    """Batch-norm weight and bias, one row per inner step ([S, C]), or shared ([C])."""

    def __init__(self, channels: int, steps: int, per_step: bool):
        super().__init__()
        shape = (steps, channels) if per_step else (channels,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        weight, bias = (self.weight[step], self.bias[step]) if self.weight.dim() == 2 else (self.weight, self.bias)
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)


class Backbone(nn.Module):
    """The paper's network: 4 x (conv3x3 -> per-step batch norm -> leaky ReLU -> 2x2 max-pool), linear head."""

    def __init__(self, cfg: MAMLConfig):
        super().__init__()
        self.num_stages = cfg.num_stages
        channels, size = cfg.image_channels, cfg.image_size
        for i in range(cfg.num_stages):
            self.add_module(f"conv{i}", nn.Conv2d(channels, cfg.num_filters, 3, padding=1))
            self.add_module(f"norm{i}", PerStepNorm(cfg.num_filters, cfg.inner_steps, cfg.per_step_bn_weights))
            channels, size = cfg.num_filters, size // 2
        self.head = nn.Linear(channels * size * size, cfg.n_way)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        for i in range(self.num_stages):
            x = getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(x), step)
            x = F.max_pool2d(F.leaky_relu(x, 0.01), 2)
        return self.head(x.flatten(1))


class FuncMAMLPlusPlus(nn.Module):
    """MAML++ with torch.func; ``forward`` returns the meta-loss and the query accuracy."""

    def __init__(self, cfg: MAMLConfig):
        super().__init__()
        self.cfg = cfg
        self.net = Backbone(cfg)
        self.adapted = [name for name, _ in self.net.named_parameters() if not name.startswith("norm")]
        self.inner_lrs = nn.ParameterDict({
            name.replace(".", "_"): nn.Parameter(torch.full((cfg.inner_steps,), cfg.inner_lr),
                                                 requires_grad=cfg.learn_inner_lrs)
            for name in self.adapted})

    def load_learner(self, learner: MAMLPlusPlus) -> "FuncMAMLPlusPlus":
        """Take ``learner``'s meta-parameters (its running statistics have no counterpart here)."""
        self.load_state_dict({name: value for name, value in learner.state_dict().items()
                              if not name.endswith(("running_mean", "running_var"))})
        return self

    def forward(self, batch: TaskBatch, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        weights = msl_weights(self.cfg, epoch)
        second_order = use_second_order(self.cfg, epoch)
        params = dict(self.net.named_parameters())
        rates = {name: self.inner_lrs[name.replace(".", "_")] for name in self.adapted}

        def logits(adapted, x, step):
            return functional_call(self.net, {**params, **adapted}, (x, step))

        def support_loss(adapted, x, y, step):
            return F.cross_entropy(logits(adapted, x, step), y)

        def task(x_support, y_support, x_query, y_query):
            adapted = {name: params[name] for name in self.adapted}
            loss = 0.0
            for step in range(self.cfg.inner_steps):
                grads = grad(support_loss)(adapted, x_support, y_support, step)
                if not second_order:
                    grads = {name: g.detach() for name, g in grads.items()}
                adapted = {name: p - rates[name][step] * grads[name] for name, p in adapted.items()}
                if weights[step] > 0:
                    query_logits = logits(adapted, x_query, step)
                    loss = loss + weights[step] * F.cross_entropy(query_logits, y_query)
            return loss, (query_logits.argmax(-1) == y_query).float().mean()

        losses, accuracies = vmap(task)(batch.x_support, batch.y_support, batch.x_query, batch.y_query)
        return losses.mean(), accuracies.mean()


def meta_iteration(peer: FuncMAMLPlusPlus, optimizer: torch.optim.Optimizer, batch: TaskBatch,
                   epoch: int) -> torch.Tensor:
    """What training repeats: meta-loss, outer backward, clipping where the config asks, Adam step."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = peer(batch, epoch)
    loss.backward()
    if peer.cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_value_(peer.parameters(), peer.cfg.grad_clip)
    optimizer.step()
    return loss
