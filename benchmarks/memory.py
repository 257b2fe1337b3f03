"""Resident memory of this process on Linux: now, at its peak, and a reset of the peak."""

from __future__ import annotations


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
