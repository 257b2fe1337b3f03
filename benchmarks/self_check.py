"""What the fused backends' self-check costs, and the errors its half-precision tolerances allow for.

- first use: the first ops.resolve of a fused backend in fresh processes, taking turns: with an empty
  cache (the check runs), with the record it left (read), and with MAMLFAST_SELF_CHECK=0; wall and
  CPU seconds of that one call, median and range over the rounds;
- per call: the verdict lookup that every op call now makes, and how many a meta-iteration makes;
- half errors (--half-errors): the torch backend's own errors in float16 and bfloat16 against
  float64, per op and phase and for the meta-iteration, on the self-check's inputs, which the
  half-precision tolerances must allow for (no fused kernel runs in a half type on the CPU).

    python benchmarks/self_check.py --backend cpp --rounds 5 --json out.json
    python benchmarks/self_check.py --half-errors
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import timeit

import torch

import mamlfast
from mamlfast import learner_check
from mamlfast.files import write_json
from mamlfast.ops import agreement, self_check
from mamlfast.ops.comparison import Tolerance, dtype_name
from mamlfast.speed import Workload, build
from mamlfast.timing import device_name, versions

FIRST_USE = """
import sys, time
import torch, mamlfast
from mamlfast import ops
wall, cpu = time.perf_counter(), time.process_time()
ops.resolve(sys.argv[1], torch.device("cpu"), getattr(torch, sys.argv[2]))
print(time.perf_counter() - wall, time.process_time() - cpu)
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="omniglot-5w1s", help="whose meta-iteration's op calls are counted")
    parser.add_argument("--half-errors", action="store_true")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def first_use(backend: str, dtype: str, cache: str, switched_off: bool = False) -> tuple[float, float]:
    env = dict(os.environ, MAMLFAST_CACHE=cache)
    if switched_off:
        env[self_check.SWITCH] = "0"
    out = subprocess.run([sys.executable, "-c", FIRST_USE, backend, dtype], env=env, capture_output=True, text=True,
                         check=True)
    wall, cpu = (float(value) for value in out.stdout.split())
    return wall, cpu


def first_use_rows(backend: str, rounds: int) -> list[dict]:
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for dtype in ("float32", "float64"):
            cache = tempfile.mkdtemp()
            for case, switched_off in (("first check", False), ("record read", False), ("switched off", True)):
                runs.setdefault((case, dtype), []).append(first_use(backend, dtype, cache, switched_off))
    rows = []
    for (case, dtype), values in runs.items():
        wall, cpu = sorted(v[0] for v in values), sorted(v[1] for v in values)
        rows.append(dict(case=case, dtype=dtype, wall_s=wall, cpu_s=cpu,
                         wall_median=statistics.median(wall), cpu_median=statistics.median(cpu)))
    return rows


def per_call(backend: str, preset: str) -> dict:
    """The lookup's microseconds (median of 30 batches), and the lookups of one meta-iteration of ``preset``."""
    cpu = torch.device("cpu")
    self_check.verdict(backend, cpu, torch.float32)
    lookups = sorted(timeit.timeit(lambda: self_check.verdict(backend, cpu, torch.float32), number=20000) / 20000
                     for _ in range(30))
    iterate, _ = build(Workload(preset, device="cpu", warmup=1), backend)
    iterate()
    calls = []
    verdict = self_check.verdict
    self_check.verdict = lambda *args: calls.append(args) or verdict(*args)
    try:
        iterate()
    finally:
        self_check.verdict = verdict
    return dict(lookup_us=statistics.median(lookups) * 1e6, lookup_us_range=[lookups[0] * 1e6, lookups[-1] * 1e6],
                lookups_per_meta_iteration=len(calls))


def half_errors() -> list[dict]:
    """The torch backend in each half type against itself in float64, on the self-check's inputs."""
    cpu, loose = torch.device("cpu"), Tolerance(1.0, 1.0)
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for op, case, phases in agreement.op_builders("cpp"):
            for comparison in agreement.compare_phases(op, case, phases, "torch", cpu, dtype, loose):
                rows.append(dict(op=op, case=case, phase=comparison.phase, dtype=comparison.dtype,
                                 rel_error=comparison.rel_error, abs_error=comparison.abs_error))
        errors, absolute = learner_check.meta_iteration_errors("torch", cpu, dtype, floor=1e-2)
        worst = max(errors, key=errors.get)
        rows.append(dict(op="meta-iteration", case=worst, phase="second order", dtype=dtype_name(dtype),
                         rel_error=errors[worst], abs_error=absolute))
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = dict(device=device_name(torch.device("cpu")), **versions(), mamlfast=mamlfast.__version__,
                  load_average=os.getloadavg())
    if args.half_errors:
        result["half_errors"] = half_errors()
        for row in result["half_errors"]:
            print(f"{row['dtype']:<9} {row['op']:<15} {row['case']:<36} {row['phase']:<16} "
                  f"relative {row['rel_error']:.1e}")
    else:
        result["first_use"] = first_use_rows(args.backend, args.rounds)
        result["per_call"] = per_call(args.backend, args.preset)
        for row in result["first_use"]:
            print(f"{row['case']:<13} {row['dtype']:<8} wall {row['wall_median']:.3f} s "
                  f"[{row['wall_s'][0]:.3f}, {row['wall_s'][-1]:.3f}]   CPU {row['cpu_median']:.3f} s "
                  f"[{row['cpu_s'][0]:.3f}, {row['cpu_s'][-1]:.3f}]")
        calls = result["per_call"]
        print(f"verdict lookup {calls['lookup_us']:.2f} us per op call [{calls['lookup_us_range'][0]:.2f}, "
              f"{calls['lookup_us_range'][1]:.2f}], {calls['lookups_per_meta_iteration']} per meta-iteration")
    print(f"load average {result['load_average']}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
