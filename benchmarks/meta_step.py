"""Milliseconds and peak memory of one meta-iteration, per backend, with the ratio to ``loop``.

A meta-iteration is what training repeats: forward (inner loops and meta-loss), outer
backward, and the Adam step. All backends are timed in one run, taking turns after a
warm-up, and each is reported as the median of its repetitions.

    python benchmarks/meta_step.py --preset omniglot-20w1s --backends loop,torch --json out.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mamlfast  # noqa: E402
from mamlfast.files import write_json  # noqa: E402
from timing import device_name, median, peak_cuda_memory, time_interleaved  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-20w1s")
    parser.add_argument("--variant", default="maml++")
    parser.add_argument("--backends", default="loop,torch", help="comma-separated; loop is always added")
    parser.add_argument("--epoch", type=int, default=50, help="sets MSL weights and derivative order (50: second order)")
    parser.add_argument("--tasks", type=int, default=None, help="meta-batch size (default: the preset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build(args, backend: str):
    """A learner on ``backend``, its optimizer, and a fixed random meta-batch."""
    overrides = dict(backend=backend)
    if args.tasks:
        overrides["meta_batch_size"] = args.tasks
    cfg = mamlfast.MAMLConfig.preset(args.preset, args.variant, **overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    learner = mamlfast.MAMLPlusPlus(cfg).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.meta_lr)
    generator = torch.Generator().manual_seed(0)

    def split(per_class):
        x = torch.randn(cfg.meta_batch_size, cfg.n_way * per_class, cfg.image_channels, cfg.image_size,
                        cfg.image_size, generator=generator)
        y = torch.arange(cfg.n_way).repeat_interleave(per_class).expand(cfg.meta_batch_size, -1).contiguous()
        return x.to(device), y.to(device)

    batch = mamlfast.TaskBatch(*split(cfg.k_shot), *split(cfg.k_query))

    def meta_iteration():
        optimizer.zero_grad(set_to_none=True)
        learner(batch, args.epoch).loss.backward()
        optimizer.step()

    return cfg, meta_iteration


def cpu_peak_memory(args, backend: str) -> int:
    """Peak resident memory a meta-iteration adds, measured in a fresh process of its own."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", backend,
               "--preset", args.preset, "--variant", args.variant, "--epoch", str(args.epoch), "--device", "cpu"]
    if args.tasks:
        command += ["--tasks", str(args.tasks)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def memory_probe(args) -> None:
    _, meta_iteration = build(args, args.memory_probe)
    # Writing 5 to clear_refs resets the resident-memory high-water mark to the current size.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    resident_before = _proc_status_bytes("VmRSS")
    meta_iteration()
    meta_iteration()
    print(_proc_status_bytes("VmHWM") - resident_before)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return {}
    device = torch.device(args.device)
    backends = ["loop"] + [b for b in args.backends.split(",") if b and b != "loop"]
    built = {backend: build(args, backend) for backend in backends}
    cfg = next(iter(built.values()))[0]
    times = time_interleaved({b: fn for b, (_, fn) in built.items()}, device, args.repeats, args.warmup)
    rows = []
    for backend, (_, fn) in built.items():
        ms = median(times[backend])
        peak = peak_cuda_memory(fn, device) if device.type == "cuda" else cpu_peak_memory(args, backend)
        rows.append(dict(preset=args.preset, variant=args.variant, backend=backend, epoch=args.epoch,
                         tasks=cfg.meta_batch_size, median_ms=ms, tasks_per_second=cfg.meta_batch_size / ms * 1e3,
                         peak_memory_mb=peak / 2**20, speedup_over_loop=median(times["loop"]) / ms,
                         all_ms=times[backend]))
    result = dict(device=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  repeats=args.repeats, warmup=args.warmup, rows=rows)
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}, torch {result['torch']}, {result['threads']} threads, "
          f"median of {result['repeats']} after {result['warmup']} warm-up")
    print(f"{'preset':<20} {'backend':<8} {'ms/iter':>10} {'tasks/s':>9} {'peak MiB':>9} {'vs loop':>8}")
    for row in result["rows"]:
        print(f"{row['preset']:<20} {row['backend']:<8} {row['median_ms']:>10.1f} {row['tasks_per_second']:>9.1f} "
              f"{row['peak_memory_mb']:>9.0f} {row['speedup_over_loop']:>7.2f}x")


if __name__ == "__main__":
    main()
