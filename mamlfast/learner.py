"""MAMLPlusPlus: the inner loop, the meta-loss, and adapt-then-predict, for all tasks at once."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import memory_pool, ops, recompute, reference
from .config import MAMLConfig
from .model import Backbone, InnerLearningRates, fold_tasks
from .schedules import msl_weights, query_steps, use_second_order
from .tasks import MetaOutput, TaskBatch, check_tasks

log = logging.getLogger(__name__)

# What a second-order meta-iteration takes beyond the tensors its graph saves (the backward's own
# gradients and workspaces), as a fraction of them: measured on the CPU (benchmarks/RESULTS.md).
BACKWARD_HEADROOM = 0.2  # the peak was 1 to 17% above the saved tensors


class MAMLPlusPlus(nn.Module):
    """MAML++ (Antoniou et al., ICLR 2019) with every technique switchable through ``cfg``.

    Meta-parameters: ``net`` (initial conv/head weights, per-step batch-norm weights) and
    ``inner_lrs`` (LSLR). ``cfg.backend == "loop"`` runs the per-task reference
    (``mamlfast.reference``); any other value runs all tasks as one network, with the hot
    ops on that backend.
    """

    def __init__(self, cfg: MAMLConfig):
        super().__init__()
        self.cfg = cfg
        self.net = Backbone(cfg)
        adapted = self.net.adapted_parameters()
        self.inner_lrs = InnerLearningRates(list(adapted), cfg.inner_steps, cfg.inner_lr, cfg.learn_inner_lrs)
        sizes = [p.numel() for p in adapted.values()]
        self.register_buffer("segment_ids", ops.segment_ids_for(sizes), persistent=False)
        self._auto_recompute: dict[tuple, bool] = {}
        if cfg.backend == "loop" and cfg.recompute:
            log.warning("recompute=%r is ignored with backend='loop': the per-task reference keeps every "
                        "inner step's graph", cfg.recompute)

    def forward(self, batch: TaskBatch, epoch: int) -> MetaOutput:
        """Adapt to each task's support set and return the meta-loss on the query sets.

        The epoch sets the multi-step loss weights and the derivative order. In training
        mode, each forward moves the batch-norm running statistics of the step it used.
        """
        batch.check(self.cfg, self.net.head.weight)
        weights = msl_weights(self.cfg, epoch)
        return self.meta_forward(batch, weights, query_steps(weights), use_second_order(self.cfg, epoch))

    def meta_forward(self, batch: TaskBatch, loss_weights, query_steps: tuple[int, ...],
                     second_order: bool) -> MetaOutput:
        """The meta-forward, unchecked; on the task-batched path free of host synchronisation.

        ``loss_weights`` [S] (floats, or a tensor that may change between CUDA-graph replays)
        weigh the query losses after the inner steps ``query_steps``; the others are skipped.
        Where second order recomputes (``cfg.recompute``), every inner step and query loss is a
        region that the outer backward runs again (``mamlfast.recompute``), but for the last step's
        where there are several.
        """
        memory_pool.serve(batch.x_support.device)
        if self.cfg.backend == "loop":
            return reference.meta_forward(self, batch, [float(w) for w in loss_weights], second_order)
        recomputing = second_order and self._recomputes(batch, query_steps)
        x_support, x_query = fold_tasks(batch.x_support), fold_tasks(batch.x_query)
        flat = self.net.flat_parameters(batch.num_tasks)
        rates = self.inner_lrs.stacked()
        meta_loss = 0.0
        per_step_losses = flat.new_full((self.cfg.inner_steps,), float("nan")).detach()
        last = self.cfg.inner_steps - 1
        for step in range(self.cfg.inner_steps):
            # The outer backward starts with the last step, whose rerun would make its tensors again
            # at once: keeping them costs a few per cent of the plain path's memory, not a rerun.
            # A single step is still recomputed: the last step's region is all there is to save.
            inner_step, query_loss = self._step_regions(recomputing and (step < last or last == 0))
            flat = inner_step(flat, x_support, batch.y_support, step, rates,
                              create_graph=second_order, use_running_stats=False)
            if step not in query_steps:
                continue
            loss, logits = query_loss(flat, x_query, batch.y_query, step)
            meta_loss = meta_loss + loss_weights[step] * loss
            per_step_losses[step] = loss.detach()
        accuracy = (logits.argmax(-1) == batch.y_query).float().mean()
        return MetaOutput(meta_loss, accuracy, per_step_losses)

    def predict(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        """Adapt to each support set (first order, ``eval_inner_steps``); query logits [B, M, n_way].

        Batch norm follows ``cfg.bn_eval``; running statistics are left unchanged.
        """
        check_tasks(self.cfg, x_support, y_support, x_query, parameter=self.net.head.weight)
        memory_pool.serve(x_support.device)
        if self.cfg.backend == "loop":
            return reference.predict(self, x_support, y_support, x_query)
        running = self.cfg.bn_eval == "running"
        xs, xq = fold_tasks(x_support), fold_tasks(x_query)
        with torch.enable_grad():
            flat = self.net.flat_parameters(x_support.shape[0]).detach()
            rates = self.inner_lrs.stacked().detach()
            for step in range(self.cfg.eval_inner_steps):
                flat = self._inner_step(flat.requires_grad_(), xs, y_support, step, rates,
                                        create_graph=False, use_running_stats=running, track=False).detach()
        with torch.no_grad():
            return self._logits(flat, xq, self.cfg.eval_inner_steps - 1, use_running_stats=running, track=False)

    def _step_regions(self, recomputed: bool) -> tuple[Callable, Callable]:
        """The inner step and the query loss, as regions that the outer backward reruns or as they are."""
        if not recomputed:
            return self._inner_step, self._query_loss
        rerun_context = self.net.hold_running_stats
        return (recompute.recomputed(self._inner_step, rerun_context),
                recompute.recomputed(self._query_loss, rerun_context))

    def _inner_step(self, flat, x, y, step, rates, *, create_graph, use_running_stats, track=True):
        """theta_{s+1} = theta_s - alpha[:, s] * grad of the support loss, for every task: [B, P]."""
        logits = self._logits(flat, x, step, use_running_stats=use_running_stats, track=track)
        # The sum over tasks of each task's mean loss: task b's parameters get its own gradient.
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
        (grads,) = torch.autograd.grad(loss, flat, create_graph=create_graph)
        lrs = rates[:, self.inner_lrs.step_column(step)]
        return ops.lslr_update(flat, grads, lrs, self.segment_ids, backend=self.cfg.backend)

    def second_order_bytes(self, batch: TaskBatch, query_steps: tuple[int, ...]) -> int:
        """Estimated memory that the graph of a second-order meta-forward of ``batch`` keeps
        without recomputation: the tensors autograd saves, counted in a dry run on the meta device
        (shapes only, no memory) of the backend that runs on ``batch``'s device."""
        shadow = MAMLPlusPlus(self.cfg.replace(backend=self._traced_backend(batch.x_support), recompute=False))
        shadow = shadow.to("meta", batch.x_support.dtype)
        meta_batch = TaskBatch(*(torch.empty_like(t, device="meta") for t in batch.tensors()))
        weights = [1.0] * self.cfg.inner_steps
        return recompute.saved_bytes(lambda: shadow.meta_forward(meta_batch, weights, query_steps, True))

    def _traced_backend(self, x: torch.Tensor) -> str:
        """The backend whose dry run on the meta device saves what ``cfg.backend`` saves on tensors like ``x``.

        Triton's autograd Functions are the cuda backend's, with other kernels; without the
        extension, the torch backend's dry run saves more than the fused backends, never less.
        """
        running = ops.resolve(self.cfg.backend, x.device, x.dtype)
        traced = "cuda" if running == "triton" else running
        return traced if ops.availability(torch.device("meta"))[traced] is None else "torch"

    def _recomputes(self, batch: TaskBatch, query_steps: tuple[int, ...]) -> bool:
        """Whether second-order meta-forwards of batches like ``batch`` recompute their inner steps.

        ``recompute="auto"`` decides once per shape of batch and set of query steps: on where the
        estimated memory of the meta-iteration (``second_order_bytes`` and the backward's
        headroom) exceeds the memory free on the device.
        """
        if self.cfg.recompute != "auto":
            return self.cfg.recompute
        device = batch.x_support.device
        key = (batch.x_support.shape, batch.x_query.shape, batch.x_support.dtype, device, query_steps)
        if key not in self._auto_recompute:
            needed = (1 + BACKWARD_HEADROOM) * self.second_order_bytes(batch, query_steps)
            free = recompute.free_bytes(device)
            on = self._auto_recompute[key] = free is not None and needed > free
            # a warning where it switches on: the configuration does not fit, and runs slower
            log.log(logging.WARNING if on else logging.INFO,
                    "recompute='auto': a second-order meta-iteration needs about %.2f GiB, %s free on %s: "
                    "recomputation %s", needed / 2**30, "unknown" if free is None else f"{free / 2**30:.2f} GiB",
                    device, "on" if on else "off")
        return self._auto_recompute[key]

    def _query_loss(self, flat, x, y, step):
        """The query loss after inner step ``step``, mean over tasks, and the logits [B, M, n_way]."""
        logits = self._logits(flat, x, step, use_running_stats=False)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits

    def _logits(self, flat, x, step, *, use_running_stats, track=True):
        return self.net.forward_tasks(flat, x, step, use_running_stats=use_running_stats,
                                      track_running_stats=track and self.training, backend=self.cfg.backend)
