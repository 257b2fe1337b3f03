"""Measurement helpers of ``mamlfast check`` and the benchmarks: interleaved repetitions, medians, device names,
versions."""

from __future__ import annotations

import os
import platform
import statistics
import time
import traceback
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{processor_name()} CPU, {os.cpu_count()} cores"


def processor_name() -> str:
    """The CPU's model name (Linux), else what the platform says, else the architecture."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def time_interleaved(functions: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                     *, errors: dict[str, str] | None = None, times: dict[str, list[float]] | None = None,
                     after_each: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Milliseconds of each call, the functions taking turns so that noise hits all alike.

    GPU time is read from CUDA events around each call. With ``errors``, a function that raises
    is dropped, its error recorded there in one line (the traceback goes to stderr), and the
    others go on. ``times``, if given, is filled as the calls happen, so that an interrupted run
    keeps what it measured. ``after_each(name)`` is called after each timed call (a progress bar).
    """
    times = {} if times is None else times
    running = dict(functions)

    def attempt(name: str, timed: bool) -> None:
        try:
            if timed:
                times[name].append(_time_once(running[name], device))
            else:
                running[name]()
        except Exception as error:
            if errors is None:
                raise
            traceback.print_exc()
            errors[name] = one_line(error)
            del running[name]

    for name in functions:
        times.setdefault(name, [])
        for _ in range(warmup):
            if name in running:
                attempt(name, timed=False)
    for _ in range(repeats):
        for name in list(running):
            attempt(name, timed=True)
            if after_each:
                after_each(name)
    return times


def one_line(error: BaseException) -> str:
    """An exception in one line: its type, the first line of its message and, if different, the last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    return f"{type(error).__name__}: {message}"[:500]


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
