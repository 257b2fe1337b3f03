"""Memory of this process: resident memory on Linux (now, at its peak, a reset of the peak), the
peak memory a piece of work holds, and that measured in a fresh process."""

from __future__ import annotations

import subprocess
from typing import Callable

import torch


def resident_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """The resident high-water mark: what GNU ``time -v`` reports as maximum resident set size."""
    return _status_bytes("VmHWM")


def reset_peak_resident() -> bool:
    """Lower the high-water mark to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def held_bytes(work: Callable[[], object], device: torch.device) -> int:
    """The most memory ``work()`` holds above what was held before it: on a GPU allocated by torch,
    on the CPU resident."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not reset_peak_resident():
        raise RuntimeError("cannot reset the resident-memory high-water mark (/proc/self/clear_refs)")
    before = resident_bytes()
    work()
    return peak_resident_bytes() - before


def probe(command: list[str]) -> int:
    """The number that ``command`` (a benchmark's memory probe, run in a fresh process with the
    environment of this one) prints last."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed: {(result.stderr.strip().splitlines() or ['no message'])[-1]}")
    return int(result.stdout.split()[-1])
