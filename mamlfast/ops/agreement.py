"""How closely a fused backend's ops agree with the torch backend's: each op's phases (values, first
and second derivatives) on small random inputs of odd sizes, against the torch backend computed in
float64 from the same values, at the tolerances the op tests use.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import batch_norm, conv, lslr, max_pool
from .comparison import OP_TOLERANCES, Comparison, Tolerance, compare_tensors, crashed, dtype_name, worst_of
from .phases import Phases, batch_norm_phases, conv_phases, lslr_phases, max_pool_phases


def as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def compare_phases(op: str, case: str, build: Callable[..., Phases], backend: str, device: torch.device,
                   dtype: torch.dtype, tolerance: Tolerance) -> list[Comparison]:
    """Every phase of ``build(backend, device, dtype, rounded_to)`` against the torch backend's in
    float64 on the same values; a phase (or the whole op) that raises is a failed comparison."""
    try:
        expected = build("torch", device, torch.float64, dtype)
        phases = build(backend, device, dtype, None)
    except Exception as error:
        phases, failure = {}, crashed(op, "forward", dtype, error, tolerance)
    else:
        failure = None
    comparisons = [failure] if failure else []
    for phase, run in phases.items():
        try:
            comparisons.append(compare_tensors(op, phase, dtype, as_tuple(run()), as_tuple(expected[phase]()),
                                               tolerance))
        except Exception as error:
            comparisons.append(crashed(op, phase, dtype, error, tolerance))
    for comparison in comparisons:
        comparison.worst = f"at {case}"
    return comparisons


# Small inputs of odd sizes: batch norm [N, B*C, H, W] with one sample, one pixel, and groups of
# 7*31*31 = 6727 values, which the CUDA kernels split over blocks where the grid is small; the LSLR
# buffer with segments straddling the kernels' blocks (1024, 2048); pooling of odd sides (floor);
# the backbone's first convolution (input without gradient) and a later one.
BATCH_NORM_SHAPES = [((3, 6, 5, 5), 3), ((1, 15, 3, 3), 5), ((5, 2, 1, 1), 2), ((7, 3, 31, 31), 3)]
LSLR_SIZES, LSLR_TASKS = [700, 1, 3000, 1299], 3
MAX_POOL_SHAPES = [(3, 5, 7, 9), (2, 3, 2, 2)]
CONV_CASES = [((5, 4, 6, 6), 12, 4, False), ((3, 6, 5, 7), 15, 3, True)]  # x, C_out*G, G, input grad


def op_builders(backend: str) -> list[tuple[str, str, Callable[..., Phases]]]:
    """(op, case, build) for each op that ``backend`` computes with kernels of its own, where
    ``build(backend, device, dtype, rounded_to)`` gives the phases of one case."""
    builders = []
    if backend in batch_norm.FUSED_BACKENDS:
        builders += [("batch norm", str(list(shape)), _bound(batch_norm_phases, shape, channels))
                     for shape, channels in BATCH_NORM_SHAPES]
    if backend in lslr.FUSED_BACKENDS:
        builders.append(("lslr update", str([LSLR_TASKS, sum(LSLR_SIZES)]),
                         _bound(lslr_phases, LSLR_SIZES, LSLR_TASKS)))
    if backend in max_pool.FUSED_BACKENDS:
        builders += [("max pool", str(list(shape)), _bound(max_pool_phases, shape)) for shape in MAX_POOL_SHAPES]
    if backend in conv.FUSED_BACKENDS:
        builders += [("conv", str(list(shape)), _bound(conv_phases, shape, out_channels, groups,
                                                       input_needs_grad=input_grad))
                     for shape, out_channels, groups, input_grad in CONV_CASES]
    return builders


def _bound(phases_of: Callable[..., Phases], *shape_args, **options) -> Callable[..., Phases]:
    def build(backend, device, dtype, rounded_to):
        return phases_of(backend, *shape_args, device, dtype, rounded_to, **options)
    return build


def compare_ops(backend: str, device: torch.device, dtype: torch.dtype) -> list[Comparison]:
    """Each op ``backend`` fuses, each phase: the worst of its cases against the torch backend."""
    if dtype not in OP_TOLERANCES:
        raise ValueError(f"the fused ops are checked in {', '.join(map(dtype_name, OP_TOLERANCES))}, not {dtype}")
    tolerance = OP_TOLERANCES[dtype]
    by_phase: dict[tuple[str, str], list[Comparison]] = {}
    for op, case, build in op_builders(backend):
        for comparison in compare_phases(op, case, build, backend, device, dtype, tolerance):
            by_phase.setdefault((op, comparison.phase), []).append(comparison)
    return [worst_of(comparisons) for comparisons in by_phase.values()]
