"""Resident memory and time of CPU meta-iterations with mamlfast's memory pool and with glibc's
allocator, with and without ``recompute``: what a user's process holds, no environment variables set.

Each (configuration, allocator) runs in a fresh process of its own, the rounds interleaved: the
meta-iterations of ``mamlfast.speed``'s workload (a preset's shapes, a fixed random meta-batch),
then the peak resident memory above the resident size before them, the process's own peak, and
the median time of the iterations after the first two, all from the same run. Ranges over rounds.

    python benchmarks/memory_pool.py --preset omniglot-20w1s --tasks 8 --threads 1 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from mamlfast.files import write_json
from mamlfast.timing import processor_name

CONFIGURATIONS = ("cpp", "cpp+recompute")
ALLOCATORS = ("pool", "glibc")
MiB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-20w1s")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--epoch", type=int, default=50, help="sets the derivative order (50: second order)")
    parser.add_argument("--iterations", type=int, default=6, help="per process; the first two are not timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--probe", nargs=2, metavar=("CONFIGURATION", "ALLOCATOR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def probe(args) -> None:
    """In a fresh process: one configuration's iterations; a JSON line of memory and times."""
    from mamlfast import memory_pool, speed
    from mamlfast.memory import peak_resident_bytes, reset_peak_resident, resident_bytes

    configuration, allocator = args.probe
    torch.set_num_threads(args.threads)
    if allocator == "glibc":
        memory_pool.disable()
    iterate, _ = speed.build(speed.Workload(preset=args.preset, tasks=args.tasks, epoch=args.epoch), configuration)
    if not reset_peak_resident():
        raise RuntimeError("cannot reset the resident-memory high-water mark (/proc/self/clear_refs)")
    before = resident_bytes()
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        iterate()
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(pool_serving=memory_pool.stats() is not None, held_mib=(peak_resident_bytes() - before) / MiB,
                          process_peak_mib=peak_resident_bytes() / MiB, times=times)))


def run_probe(args, configuration: str, allocator: str) -> dict:
    command = [sys.executable, __file__, "--probe", configuration, allocator, "--preset", args.preset,
               "--tasks", str(args.tasks), "--epoch", str(args.epoch), "--iterations", str(args.iterations),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{configuration} with {allocator}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    rows = {(c, a): [] for c in CONFIGURATIONS for a in ALLOCATORS}
    for round_ in range(args.rounds):
        for key in rows:
            rows[key].append(run_probe(args, *key))
            print(f"round {round_ + 1}: {key[0]} with {key[1]}: {rows[key][-1]['held_mib']:.0f} MiB held", flush=True)
    summary = []
    for (configuration, allocator), runs in rows.items():
        held = [run["held_mib"] for run in runs]
        seconds = [statistics.median(run["times"][2:]) for run in runs]
        summary.append(dict(configuration=configuration, allocator=allocator,
                            pool_serving=[run["pool_serving"] for run in runs], held_mib=held,
                            process_peak_mib=[run["process_peak_mib"] for run in runs], median_s=seconds))
        print(f"{configuration:>14} {allocator:>5}: held {min(held):.0f} to {max(held):.0f} MiB, "
              f"median {min(seconds):.3f} to {max(seconds):.3f} s per iteration")
    if args.json:
        write_json(args.json, dict(preset=args.preset, tasks=args.tasks, epoch=args.epoch, threads=args.threads,
                                   processor=processor_name(), torch=torch.__version__, rounds=summary))


if __name__ == "__main__":
    main()
