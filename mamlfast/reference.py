"""The per-task reference: MAML++ one task at a time, written for clarity above all.

This is the yardstick for every other path: the equivalence tests compare them with it,
and the benchmarks report their speed as a ratio to it. It shares the learner's parameters
but none of its execution code: its own per-task forward, batch norm written out from its
definition, and a plain per-tensor update.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from .model import LEAKY_RELU_SLOPE, Backbone, PerStepBatchNorm
from .tasks import MetaOutput, TaskBatch


def meta_forward(learner, batch: TaskBatch, weights: list[float], second_order: bool) -> MetaOutput:
    """Meta-loss of ``batch`` with query-loss weights [S] (MSL) and the given derivative order."""
    cfg, net = learner.cfg, learner.net
    stats = _StatisticsLog()
    task_losses, accuracies, query_losses = [], [], defaultdict(list)
    for task in range(batch.num_tasks):
        params = list(net.adapted_parameters().values())
        task_loss = 0.0
        for step in range(cfg.inner_steps):
            params = _adapt(learner, params, batch.x_support[task], batch.y_support[task], step,
                            create_graph=second_order, record=stats.recorder(step, "support"))
            if weights[step] == 0:
                continue
            logits = task_logits(net, params, batch.x_query[task], step, use_running_stats=False,
                                 record=stats.recorder(step, "query"))
            loss = F.cross_entropy(logits, batch.y_query[task])
            task_loss = task_loss + weights[step] * loss
            query_losses[step].append(loss.detach())
        task_losses.append(task_loss)
        accuracies.append((logits.argmax(-1) == batch.y_query[task]).float().mean())
    if learner.training:
        stats.apply(net)
    not_computed = batch.x_query.new_tensor(float("nan"))
    per_step_losses = torch.stack([torch.stack(query_losses[step]).mean() if step in query_losses else not_computed
                                   for step in range(cfg.inner_steps)])
    return MetaOutput(torch.stack(task_losses).mean(), torch.stack(accuracies).mean().detach(), per_step_losses)


def predict(learner, x_support, y_support, x_query) -> torch.Tensor:
    cfg, net = learner.cfg, learner.net
    running = cfg.bn_eval == "running"
    last = cfg.eval_inner_steps - 1
    logits = []
    for task in range(x_support.shape[0]):
        params = [p.detach() for p in net.adapted_parameters().values()]
        with torch.enable_grad():
            for step in range(cfg.eval_inner_steps):
                params = [p.requires_grad_() for p in params]
                params = [p.detach() for p in _adapt(learner, params, x_support[task], y_support[task], step,
                                                     create_graph=False, use_running_stats=running)]
        with torch.no_grad():
            logits.append(task_logits(net, params, x_query[task], last, use_running_stats=running))
    return torch.stack(logits)


def _adapt(learner, params, x, y, step, *, create_graph, use_running_stats=False, record=None):
    """One inner step of one task: theta - alpha[tensor, step] * grad, tensor by tensor."""
    loss = F.cross_entropy(task_logits(learner.net, params, x, step, use_running_stats=use_running_stats,
                                       record=record), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    column = learner.inner_lrs.step_column(step)
    rates = [getattr(learner.inner_lrs, name)[column] for name in learner.inner_lrs.names]
    return [p - rate * g for p, rate, g in zip(params, rates, grads)]


def task_logits(net: Backbone, params, x, step, *, use_running_stats, record=None) -> torch.Tensor:
    """Logits [M, n_way] of one task's images x [M, C, H, W] with its adapted ``params``."""
    for i, norm in enumerate(net.norms()):
        x = F.conv2d(x, params[2 * i], params[2 * i + 1], padding=1)
        layer_record = None if record is None else (lambda mean, var, i=i: record(i, mean, var))
        x = _batch_norm(x, norm, step, use_running_stats, layer_record)
        x = F.max_pool2d(F.leaky_relu(x, LEAKY_RELU_SLOPE), 2)
    return F.linear(x.flatten(1), params[-2], params[-1])


def _batch_norm(x, norm: PerStepBatchNorm, step, use_running_stats, record):
    weight, bias, running_mean, running_var = norm.at(step)
    if use_running_stats:
        mean, var = running_mean, running_var
    else:
        mean = x.mean(dim=(0, 2, 3))
        var = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        if record is not None:
            n = x.numel() // x.shape[1]
            record(mean.detach(), var.detach() * n / (n - 1))
    def channel(t):
        return t.view(1, -1, 1, 1)
    return (x - channel(mean)) / torch.sqrt(channel(var) + norm.eps) * channel(weight) + channel(bias)


class _StatisticsLog:
    """Per-task batch statistics, applied to the running statistics after the whole batch.

    A forward over the meta-batch moves a step's running statistics once, towards the mean
    over tasks of the per-task statistics; updates happen in the order the batched path makes
    them: for each step, the support forward, then the query forward.
    """

    def __init__(self):
        self.entries = defaultdict(list)  # (step, phase, layer) -> [(mean, unbiased var) per task]

    def recorder(self, step: int, phase: str):
        return lambda layer, mean, var: self.entries[(step, phase == "query", layer)].append((mean, var))

    def apply(self, net: Backbone) -> None:
        norms = net.norms()
        with torch.no_grad():
            for (step, _, layer), per_task in sorted(self.entries.items(), key=lambda item: item[0]):
                norm = norms[layer]
                _, _, running_mean, running_var = norm.at(step)
                running_mean.lerp_(torch.stack([m for m, _ in per_task]).mean(0), norm.momentum)
                running_var.lerp_(torch.stack([v for _, v in per_task]).mean(0), norm.momentum)
