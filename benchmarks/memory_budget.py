"""The largest meta-batch and the most inner steps whose meta-iteration fits a memory budget,
with and without ``recompute``.

Peak memory is measured as ``meta_step.py`` measures it (a fresh process per point) at a few
meta-batch sizes and numbers of inner steps; memory grows in a straight line with either, so a
least-squares line through the points gives the largest size under the budget. A point whose
peak the points before it predict above ``--max-measure-gib`` is not measured (the machine is
shared): the answer is then an estimate from the smaller points, and says so.

    python benchmarks/memory_budget.py --preset omniglot-20w1s --tasks 2,4,8 --steps 5,10 --json out.json
"""

from __future__ import annotations

import argparse
import math

import torch

import mamlfast
from mamlfast.files import write_json
from mamlfast.speed import Workload, peak_memory
from mamlfast.timing import device_name, versions

GIB = 2**30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-20w1s")
    parser.add_argument("--variant", default="maml++")
    parser.add_argument("--configurations", default="torch,torch+recompute")
    parser.add_argument("--epoch", type=int, default=50, help="50: second order, after MSL")
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--max-measure-gib", type=float, default=6.0, help="measure no point predicted above this")
    parser.add_argument("--tasks", default="2,4,8", help="meta-batch sizes to measure, at the preset's inner steps")
    parser.add_argument("--steps", default="5,10", help="inner steps to measure, at the preset's meta-batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def measure(args, configuration: str, tasks: int, steps: int) -> int:
    workload = Workload(args.preset, args.variant, args.epoch, tasks, dict(inner_steps=steps, eval_inner_steps=steps),
                        args.device, args.warmup, args.threads)
    return peak_memory(workload, configuration)


def line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of bytes against size."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def largest_fitting(args, configuration: str, unit: str, sizes: list[int], point) -> dict:
    """Measure ``point(size)`` over ``sizes`` (skipping predicted-too-large ones) and solve for the budget."""
    measured, skipped = [], []
    for size in sizes:
        if len(measured) >= 2:
            intercept, slope = line(measured)
            if intercept + slope * size > args.max_measure_gib * GIB:
                skipped.append(size)
                continue
        measured.append((size, point(size)))
        print(f"  {configuration:<18} {unit} {size:>4}: {measured[-1][1] / GIB:.2f} GiB", flush=True)
    intercept, slope = line(measured)
    budget = args.budget_gib * GIB
    largest = math.floor((budget - intercept) / slope) if slope > 0 else None
    return dict(measured_gib={size: peak / GIB for size, peak in measured}, not_measured=skipped,
                intercept_gib=intercept / GIB, gib_per_unit=slope / GIB, largest=largest,
                largest_measured=largest is not None and any(size >= largest for size, _ in measured))


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = mamlfast.MAMLConfig.preset(args.preset, args.variant)
    tasks = [int(t) for t in args.tasks.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for configuration in args.configurations.split(","):
        print(f"{configuration}: meta-batch at {cfg.inner_steps} inner steps, then inner steps at meta-batch "
              f"{cfg.meta_batch_size}", flush=True)
        by_tasks = largest_fitting(args, configuration, "tasks", tasks,
                                   lambda b: measure(args, configuration, b, cfg.inner_steps))
        by_steps = largest_fitting(args, configuration, "steps", steps,
                                   lambda s: measure(args, configuration, cfg.meta_batch_size, s))
        rows.append(dict(configuration=configuration, meta_batch=by_tasks, inner_steps=by_steps))
    result = dict(device=device_name(torch.device(args.device)), **versions(), preset=args.preset,
                  variant=args.variant, epoch=args.epoch, budget_gib=args.budget_gib, preset_inner_steps=cfg.inner_steps,
                  preset_meta_batch=cfg.meta_batch_size, rows=rows)
    print(f"{args.preset}, budget {args.budget_gib} GiB: largest meta-batch ({cfg.inner_steps} steps) / "
          f"most inner steps (meta-batch {cfg.meta_batch_size})")
    for row in rows:
        print(f"  {row['configuration']:<18} {row['meta_batch']['largest']!s:>6} / {row['inner_steps']['largest']!s:>6}"
              f"   ({row['meta_batch']['gib_per_unit']:.3f} GiB per task, "
              f"{row['inner_steps']['gib_per_unit']:.3f} GiB per step)")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
