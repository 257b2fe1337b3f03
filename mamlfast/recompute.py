"""Recomputation in the outer backward: a region of the meta-forward keeps its graph, not its tensors.

Second-order MAML keeps, for every inner step, the activations of its forward and everything the
graph of its inner gradient saved, until the outer backward. ``recomputed(fn)`` runs ``fn`` (one
inner step, or one query loss) under saved-tensor hooks: while ``fn`` runs, the tensors autograd
saves are held, so that the inner gradient inside ``fn`` finds them; once it has returned they are
let go and the graph keeps placeholders. When the outer backward unpacks a placeholder, ``fn`` runs
again on the same inputs (which the caller keeps: for an inner step, the [B, P] buffer of adapted
parameters), the tensors it saves are collected in the order they were saved the first time, and
each is handed out once and then dropped, so that at most one region is held at a time.

The graph is the one the first run built, so the outer backward runs the same operations in the
same order as without recomputation: the meta-loss and the meta-gradients are bitwise the same,
whatever the backend of the hot ops. A rerun runs under ``rerun_context`` (the learner's: batch
norm leaves the running statistics alone) and nothing in it waits on the host, so it can be
captured in a CUDA graph. ``torch.utils.checkpoint`` (non-reentrant) computes the same gradients,
but it drops saved tensors as soon as they are saved, so an inner gradient taken inside the region
recomputes the region's forward already in the forward pass: one support forward more per step.

``saved_bytes`` and ``free_bytes`` are what ``recompute="auto"`` weighs: the memory the graph of a
meta-forward keeps, and the memory left on the device.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import torch
from torch.autograd.graph import saved_tensors_hooks


def recomputed(fn: Callable, rerun_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> Callable:
    """``fn`` as a region whose saved tensors are recomputed when the outer backward needs them."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        region = _Region(functools.partial(fn, *args, **kwargs), rerun_context)
        try:
            with saved_tensors_hooks(region.pack, region.unpack):
                return fn(*args, **kwargs)
        finally:
            region.release()
    return run


class _Region:
    """The tensors one run of a region saved, by the order in which they were saved."""

    def __init__(self, rerun: Callable[[], object], rerun_context):
        self.rerun, self.rerun_context = rerun, rerun_context
        self.saved: list[torch.Tensor | None] = []
        self.metadata: list[tuple] = []
        self.running = True

    def pack(self, tensor: torch.Tensor) -> int:
        self.saved.append(tensor)
        self.metadata.append(_metadata(tensor))
        return len(self.saved) - 1

    def unpack(self, index: int) -> torch.Tensor:
        if self.saved[index] is None:
            self._recompute()
        tensor = self.saved[index]
        if not self.running:  # the outer backward unpacks each saved tensor once
            self.saved[index] = None
        return tensor

    def release(self) -> None:
        """The region has run: keep only placeholders."""
        self.running = False
        self.saved = [None] * len(self.saved)

    def _recompute(self) -> None:
        collected = []

        def collect(tensor):
            # Detached: a saved tensor that holds its own node would make a cycle that keeps the
            # rerun's graph alive.
            tensor = tensor.detach()
            collected.append(tensor)
            return tensor

        with saved_tensors_hooks(collect, lambda tensor: tensor), torch.enable_grad(), self.rerun_context():
            self.rerun()
        if [_metadata(t) for t in collected] != self.metadata:
            raise RuntimeError(f"recomputation saved {len(collected)} tensors where the forward saved "
                               f"{len(self.metadata)}, or ones of other shapes: the region is not deterministic")
        self.saved = collected


def _metadata(tensor: torch.Tensor) -> tuple:
    return tensor.shape, tensor.dtype, tensor.device


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages that autograd saves while ``fn`` runs.

    Run on the meta device, this measures a computation's graph without memory or arithmetic.
    """
    storages = {}

    def count(tensor):
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage
        return tensor.detach()

    with saved_tensors_hooks(count, lambda tensor: tensor):
        fn()
    return sum(storage.nbytes() for storage in storages.values())


def free_bytes(device: torch.device) -> int | None:
    """Memory a computation on ``device`` can still take, or None where it cannot be told.

    GPU: what the driver reports free plus what torch's caching allocator holds unused; CPU: the
    kernel's estimate of available memory (Linux ``MemAvailable``).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
