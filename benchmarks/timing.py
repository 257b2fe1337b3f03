"""Shared measurement helpers: interleaved repetitions, medians, device names, versions."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def time_interleaved(functions: dict[str, Callable[[], object]], device: torch.device,
                     repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of each call, the functions taking turns so that noise hits all alike.

    GPU time is read from CUDA events around each call.
    """
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            times[name].append(_time_once(fn, device))
    return times


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median(values: list[float]) -> float:
    return statistics.median(values)


def versions() -> dict:
    """The torch and Triton versions, for the record of a run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version)
