"""Comparisons of a fused backend's outputs with the torch backend's, and the tolerances they are
held to: elementwise for the ops (``OP_TOLERANCES``, the numbers the op tests use)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from ..files import first_line


@dataclass(frozen=True)
class Tolerance:
    """Agreement of every element: |actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|,
    as ``torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)`` does for tensors of values
    up to 1; above, atol grows with the tensor's largest value (gradients summed over many values)."""
    rtol: float
    atol: float

    def __str__(self) -> str:
        return f"rtol {self.rtol:.0e}, atol {self.atol:.0e}"


# Against float64 values of the same inputs. float64 and float32: the op tests' numbers. The half
# types round every stored value to 3 or 2 significant digits: the torch backend's own errors on
# these inputs reach 2e-3 (float16) and 2e-2 (bfloat16) of a tensor's largest value for batch norm,
# 6e-3 and 1e-1 for the LSLR update's second derivatives, which sum 3000 products in the half type
# (benchmarks/RESULTS.md); the fused kernels sum in float32.
OP_TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-9, atol=1e-9),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-4),
    torch.float16: Tolerance(rtol=2e-2, atol=2e-2),
    torch.bfloat16: Tolerance(rtol=1e-1, atol=1e-1),
}


@dataclass
class Comparison:
    """One output of a fused backend against the torch backend: the largest absolute error, the
    largest error relative to the largest expected magnitude, and whether it is within tolerance.
    ``error`` is the exception the fused backend raised instead (one line), if it did."""
    op: str
    phase: str
    dtype: str
    abs_error: float | None
    rel_error: float | None
    tolerance: str
    ok: bool
    error: str | None = None
    worst: str | None = None  # where the largest error is: the case or the output

    def describe(self) -> str:
        """What was found, in one line: '<op> <phase> (<dtype>): ...'."""
        where = f"{self.op} {self.phase}".strip() + f" ({self.dtype})"
        if self.error is not None:
            return f"{where}: raised {self.error}"
        if self.abs_error is None:
            return f"{where}: values are not finite where torch's are{self._of_worst()}"
        verdict = "within" if self.ok else "beyond"
        return (f"{where}: max abs error {self.abs_error:.1e}, relative {self.rel_error:.1e}{self._of_worst()}, "
                f"{verdict} tolerance ({self.tolerance})")

    def _of_worst(self) -> str:
        return f" ({self.worst})" if self.worst else ""

    def to_dict(self) -> dict:
        return asdict(self)


def crashed(op: str, phase: str, dtype: torch.dtype, error: BaseException, tolerance: object) -> Comparison:
    return Comparison(op, phase, dtype_name(dtype), None, None, str(tolerance), False,
                      f"{type(error).__name__}: {first_line(error)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compare_tensors(op: str, phase: str, dtype: torch.dtype, actual: Iterable, expected: Iterable,
                    tolerance: Tolerance) -> Comparison:
    """``actual`` tensors (None where an input does not enter) against ``expected``, elementwise."""
    abs_error = rel_error = 0.0
    ok = True
    for a, e in zip(actual, expected, strict=True):
        if (a is None) != (e is None):
            raise RuntimeError(f"{op} {phase}: an output is None on one backend only")
        if e is None or e.numel() == 0:
            continue
        a, e = a.detach().to(torch.float64), e.detach().to(torch.float64)
        if a.shape != e.shape:
            raise RuntimeError(f"{op} {phase}: shape {tuple(a.shape)}, torch's {tuple(e.shape)}")
        difference = (a - e).abs()
        if not bool(torch.isfinite(difference).all()):  # NaN or infinity where torch's values are finite
            return Comparison(op, phase, dtype_name(dtype), None, None, str(tolerance), False)
        largest, scale = difference.max().item(), e.abs().max().item()
        ok &= bool((difference <= tolerance.atol * max(1.0, scale) + tolerance.rtol * e.abs()).all())
        abs_error = max(abs_error, largest)
        rel_error = max(rel_error, largest / max(scale, math.ulp(1.0)))
    return Comparison(op, phase, dtype_name(dtype), abs_error, rel_error, str(tolerance), ok)


def worst_of(comparisons: list[Comparison]) -> Comparison:
    """The failed comparison that says most (a crash, then non-finite values), else the largest error."""
    failed = [c for c in comparisons if not c.ok]
    if not failed:
        return max(comparisons, key=lambda c: c.rel_error)
    return min(failed, key=lambda c: (c.error is None, c.abs_error is not None))
