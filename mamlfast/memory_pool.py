"""The CPU memory pool: where CPU tensors of 256 KiB or more get their memory once mamlfast works on the CPU.

torch's CPU allocator calls glibc's malloc, whose heap keeps the memory of freed activations
behind the small objects of autograd's graph: resident memory grows far above the tensors alive,
most of all with ``recompute``, whose regions free their activations one after another
(``csrc/memory_pool_cpu.cpp`` says how, ``benchmarks/RESULTS.md`` what it measured). The pool
keeps large tensors apart and reuses their memory without new page faults. The learner installs
it (``serve``) before its first meta-forward or adaptation on CPU tensors, where the extension is
built; from then on it serves every CPU tensor of the process from 256 KiB up, and it stays.
``disable()`` before that keeps glibc's allocator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.extension import load_error

_state = dict(wanted=True, serving=False)


@dataclass(frozen=True)
class PoolStats:
    reserved: int   # bytes mapped from the kernel, resident where touched
    allocated: int  # bytes of them holding tensors
    segments: int


def serve(device: torch.device) -> bool:
    """Before work on ``device``: on the CPU, install the pool unless disabled or the extension is
    missing. Whether the pool serves this process's CPU tensors."""
    if device.type == "cpu" and _state["wanted"] and not _state["serving"] and load_error() is None:
        from . import _C
        _state["serving"] = _C.enable_memory_pool()
    return _state["serving"]


def disable() -> None:
    """Keep torch's CPU allocator: call before mamlfast's first work on the CPU (the pool stays once installed)."""
    if _state["serving"]:
        raise RuntimeError("the CPU memory pool serves this process already, and stays: call "
                           "mamlfast.memory_pool.disable() before the first meta-forward or prediction on the CPU")
    _state["wanted"] = False


def stats() -> PoolStats | None:
    """What the pool holds, or None where it does not serve."""
    if not _state["serving"]:
        return None
    from . import _C
    return PoolStats(*_C.memory_pool_stats())


def release() -> int:
    """Unmap the pool's segments that hold no tensor (as ``torch.cuda.empty_cache`` does on a GPU): the bytes."""
    if not _state["serving"]:
        return 0
    from . import _C
    return _C.release_memory_pool()
