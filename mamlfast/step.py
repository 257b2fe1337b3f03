"""One meta-iteration (meta-forward, outer backward, clipping, Adam step), eager or as a CUDA graph.

Captured, the whole meta-iteration is one graph replay: the meta-batch is copied into static
buffers, the MSL weights live in a device tensor, and Adam runs in its capturable form with
its learning rate a device tensor, so that none of them needs a new capture when it changes.
What does need one is the shape of the computation: whether the intermediate query losses
are computed (MSL on or off) and the derivative order. Each such phase is captured once,
after two eager warm-up iterations, and replaced when the next phase begins.
"""

from __future__ import annotations

import logging
import math

import torch

from .config import MAMLConfig
from .distributed import Ranks
from .learner import MAMLPlusPlus
from .schedules import host_base_rates, msl_weights, query_steps, use_second_order
from .tasks import MetaOutput, TaskBatch

log = logging.getLogger(__name__)
WARMUP_ITERATIONS = 2


def make_optimizer(learner: MAMLPlusPlus, cfg: MAMLConfig, device: torch.device) -> torch.optim.Adam:
    """Adam over all meta-parameters; on a GPU in its capturable form, the rate a device tensor."""
    if device.type == "cuda":
        return torch.optim.Adam(learner.parameters(), lr=torch.tensor(cfg.meta_lr, device=device), capturable=True)
    return torch.optim.Adam(learner.parameters(), lr=cfg.meta_lr)


def match_optimizer_to_device(optimizer: torch.optim.Adam, scheduler, device: torch.device) -> None:
    """After loading states saved on another kind of device: capturable form, rate and step
    counters as ``make_optimizer`` makes them for ``device``, the schedule's arithmetic on the host."""
    host_base_rates(scheduler)
    capturable = device.type == "cuda"
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if capturable else lr
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device if capturable else "cpu", torch.float32)


class NonFiniteRecord:
    """The first meta-iteration whose meta-loss or meta-gradient was not finite (NaN or inf), kept
    on the device and updated inside every meta-iteration, eager or replayed from a CUDA graph,
    so that watching for divergence needs no host synchronisation: ``first`` is read back only
    where the caller reads values back anyway.
    """

    def __init__(self, device: torch.device):
        self.done = torch.zeros((), dtype=torch.float64, device=device)           # meta-iterations run
        self.first = torch.full((), math.inf, dtype=torch.float64, device=device)  # inf: none yet

    def restart(self, done: int) -> None:
        """Count on from ``done`` meta-iterations, none of them non-finite."""
        self.done.fill_(done)
        self.first.fill_(math.inf)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, parameters) -> None:
        """Count one meta-iteration, with its meta-loss and the gradients of ``parameters``."""
        self.done.add_(1)
        values = torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in parameters if p.grad is not None])
        finite = torch.isfinite(values).all()
        self.first.copy_(torch.where(finite, self.first, torch.minimum(self.first, self.done)))


class MetaStep:
    """Runs meta-iterations of ``learner`` with ``optimizer``, captured in CUDA graphs where
    ``cfg.cuda_graphs`` asks and the device allows, eagerly otherwise. With several ``ranks``,
    each computes the meta-gradient of its share of the tasks and the ranks average them.

    What really ran is recorded: ``replays`` counts the meta-iterations replayed from a graph,
    ``graph_replayed`` says whether the last one was, and ``eager_reason`` says why graphs that
    were asked for are not used (no CUDA device, the reference path, several ranks, a failed capture)."""

    def __init__(self, learner: MAMLPlusPlus, optimizer: torch.optim.Optimizer, cfg: MAMLConfig,
                 device: torch.device, ranks: Ranks = Ranks()):
        self.learner, self.optimizer, self.cfg, self.device, self.ranks = learner, optimizer, cfg, device, ranks
        # Why meta-iterations run eagerly although graphs were asked for (None: they were not, or they run captured)
        self.eager_reason = self._graphs_impossible_reason() if cfg.cuda_graphs else None
        if self.eager_reason:
            log.info("%s", self.eager_reason)
        self.graphs = cfg.cuda_graphs and self.eager_reason is None
        self.replays = 0
        self._last_replayed = False
        self.phase = None          # (second order, query steps) of the current graph
        self.graph = None
        self.warmups_left = 0
        self.static_batch: TaskBatch | None = None
        self.static_weights = None   # [S] on the device, refilled when the epoch changes them
        self.host_weights: list[float] | None = None
        self.static_out: MetaOutput | None = None
        self.nonfinite = NonFiniteRecord(device)

    def __call__(self, batch: TaskBatch, epoch: int) -> MetaOutput:
        """One meta-iteration on ``batch``. In graph mode the outputs are static tensors,
        overwritten by the next call."""
        weights = msl_weights(self.cfg, epoch)
        phase = (use_second_order(self.cfg, epoch), query_steps(weights))
        self._last_replayed = False
        if not self.graphs:
            return self._body(batch, weights, *phase)
        if phase != self.phase:
            self.phase, self.graph, self.warmups_left = phase, None, WARMUP_ITERATIONS
        self._fill_static(batch, weights)
        if self.warmups_left:
            self.warmups_left -= 1
            return self._warmup(*phase)
        if self.graph is None:
            self._capture(*phase)
            if not self.graphs:  # capture failed: this iteration runs eagerly
                return self._body(self.static_batch, weights, *phase)
        self.graph.replay()
        self.replays += 1
        self._last_replayed = True
        return self.static_out

    @property
    def graph_replayed(self) -> bool:
        """Whether the last meta-iteration was replayed from a CUDA graph (not run eagerly)."""
        return self._last_replayed

    def _body(self, batch, weights, second_order, steps) -> MetaOutput:
        # Inside a capture this launches nothing: the gradients the backward then creates
        # come from the graph's memory and are rewritten by every replay.
        self.optimizer.zero_grad(set_to_none=True)
        out = self.learner.meta_forward(batch, weights, steps, second_order)
        out.loss.backward()
        self.ranks.average_gradients(self.learner.parameters())
        self.nonfinite.update(out.loss, self.learner.parameters())
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self.learner.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return out

    def _graphs_impossible_reason(self) -> str | None:
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device: meta-iterations run eagerly on {self.device}"
        if self.cfg.backend == "loop":
            return "CUDA graphs are not used with the per-task reference path (backend='loop')"
        if self.ranks.world > 1:
            return "CUDA graphs are not used across several ranks: meta-iterations run eagerly"
        return None

    def _fill_static(self, batch: TaskBatch, weights: list[float]) -> None:
        if self.static_batch is None:
            self.static_batch = TaskBatch(*(t.clone() for t in batch.tensors()))
            self.static_weights = torch.tensor(weights, device=self.device)
        else:
            for static, fresh in zip(self.static_batch.tensors(), batch.tensors()):
                static.copy_(fresh, non_blocking=True)
        if weights != self.host_weights:
            self.static_weights.copy_(torch.tensor(weights))
            self.host_weights = weights

    def _warmup(self, second_order, steps) -> MetaOutput:
        """An eager iteration on a side stream, as capture wants before it (libraries' lazy setup)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self._body(self.static_batch, self.static_weights, second_order, steps)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, second_order, steps) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._body(self.static_batch, self.static_weights, second_order, steps)
        except RuntimeError as error:
            self.eager_reason = f"CUDA graph capture failed, running meta-iterations eagerly: {error}"
            log.warning("%s", self.eager_reason)
            self.graphs = False
            return
        self.graph = graph
        self.static_out = MetaOutput(out.loss.detach(), out.accuracy, out.per_step_losses)
