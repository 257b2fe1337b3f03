"""Data-parallel meta-training over torch.distributed: the meta-batch's tasks split across ranks.

Every rank draws the whole meta-batch's task indices from the same seed and keeps its own
slice, so G ranks together see exactly the tasks one process would. The meta-loss is a mean
over tasks, so averaging the ranks' gradients of their local means gives the single-process
meta-gradient (the slices are equal). Running statistics need no collective per iteration:
each update is affine with the same coefficients on every rank, so the ranks' average is
always the single-process value; it is taken before anything reads them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A collective failed: a rank died, or stopped answering within the timeout."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes (one process: rank 0 of 1, no collectives)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def task_slice(self, tasks: int) -> slice:
        """This rank's share of ``tasks``, which the world size divides."""
        share = tasks // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, in place, made the mean of its values over ranks."""
        if self.world > 1:
            _all_reduce(tensor)
            tensor /= self.world
        return tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, in place, made the minimum of its values over ranks."""
        if self.world > 1:
            _all_reduce(tensor, dist.ReduceOp.MIN)
        return tensor

    def average_gradients(self, parameters) -> None:
        """Replace every gradient by its mean over ranks, in one collective."""
        if self.world == 1:
            return
        parameters = list(parameters)
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self.mean(torch.cat([p.grad.reshape(-1) for p in parameters]))
        offset = 0
        for p in parameters:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Make every floating-point buffer the mean of its values over ranks."""
        for buffer in module.buffers():
            if buffer.is_floating_point():
                self.mean(buffer)

    def eval_slice(self, total: int, rank: int | None = None) -> slice:
        """A rank's contiguous share of ``total`` evaluation tasks (the last shares may be short)."""
        rank = self.rank if rank is None else rank
        share = -(-total // self.world)
        return slice(min(rank * share, total), min((rank + 1) * share, total))

    def gather(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's ``local`` result for its ``eval_slice``, concatenated in task order."""
        if self.world == 1:
            return local
        padded = local.new_zeros(-(-total // self.world))
        padded[:local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        _call(dist.all_gather, parts, padded)
        shares = [self.eval_slice(total, rank) for rank in range(self.world)]
        return torch.cat([part[:share.stop - share.start] for part, share in zip(parts, shares)])

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=device)
        _all_reduce(value, dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world > 1:
            _call(dist.barrier)


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
    _call(dist.all_reduce, tensor, op)


def _call(collective, *args):
    try:
        return collective(*args)
    except RuntimeError as error:
        raise DistributedError(f"rank {dist.get_rank()} lost contact with the other ranks (one died or is "
                               f"stuck): {error}") from None


def from_environment(meta_batch_size: int, timeout_seconds: float) -> Ranks:
    """The ranks torchrun describes in the environment; initialises the process group if several.

    NCCL on GPUs, gloo on the CPU; collectives that wait longer than ``timeout_seconds`` fail.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if meta_batch_size % world:
        raise ValueError(f"MAMLConfig.meta_batch_size={meta_batch_size} does not divide among {world} ranks: "
                         f"choose a multiple of {world}")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds)
    dist.init_process_group(backend, timeout=timeout, **_store_of_this_attempt(rank, world, timeout))
    return Ranks(rank, world, local_rank)


def _store_of_this_attempt(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun, the store through which the ranks find each other, its keys set apart by the
    restart (torchrun keeps one store for all of them, and a restarted rank that read a dead rank's
    address from an earlier attempt would fail to connect); else nothing: the environment's."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dict(store=dist.PrefixStore(f"mamlfast/attempt-{attempt}", store), rank=rank, world_size=world)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
