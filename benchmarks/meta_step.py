"""Milliseconds and peak memory of one meta-iteration, per backend, with the ratio to ``loop``.

A meta-iteration is what training repeats (``mamlfast.step.MetaStep``): forward (inner loops
and meta-loss), outer backward, and the Adam step. All configurations are timed in one run,
taking turns after a warm-up, and each is reported as the median of its repetitions. A
configuration is a backend, with ``+graphs`` to replay the iteration from a CUDA graph and
``+recompute`` to recompute the inner steps in the outer backward (``MAMLConfig.recompute``).
Peak memory is measured for each configuration in a fresh process of its own: the most
memory (GPU: allocated by torch; CPU: resident) held above what the model and batch need.

    python benchmarks/meta_step.py --preset omniglot-20w1s --backends loop,torch,auto,auto+graphs --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mamlfast  # noqa: E402
from mamlfast.files import write_json  # noqa: E402
from mamlfast.step import MetaStep, make_optimizer  # noqa: E402
from timing import device_name, median, time_interleaved, versions  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-20w1s")
    parser.add_argument("--variant", default="maml++")
    parser.add_argument("--backends", default="loop,torch", help="comma-separated, each optionally +graphs "
                                                                 "and/or +recompute; loop is always added")
    parser.add_argument("--epoch", type=int, default=50, help="sets MSL weights and derivative order (50: second order)")
    parser.add_argument("--tasks", type=int, default=None, help="meta-batch size (default: the preset's)")
    parser.add_argument("--inner-steps", type=int, default=None, help="inner steps (default: the preset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="at least 3 for +graphs: 2 eager, then the capture")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build(args, configuration: str):
    """A meta-iteration of ``configuration`` ("backend[+graphs][+recompute]") on a fixed random meta-batch."""
    backend, graphs, recompute = parse_configuration(configuration)
    overrides = dict(backend=backend, cuda_graphs=graphs, recompute=recompute)
    if args.tasks:
        overrides["meta_batch_size"] = args.tasks
    if args.inner_steps:
        overrides.update(inner_steps=args.inner_steps, eval_inner_steps=args.inner_steps)
    cfg = mamlfast.MAMLConfig.preset(args.preset, args.variant, **overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    learner = mamlfast.MAMLPlusPlus(cfg).to(device)
    meta_step = MetaStep(learner, make_optimizer(learner, cfg, device), cfg, device)
    generator = torch.Generator().manual_seed(0)

    def split(per_class):
        x = torch.randn(cfg.meta_batch_size, cfg.n_way * per_class, cfg.image_channels, cfg.image_size,
                        cfg.image_size, generator=generator)
        y = torch.arange(cfg.n_way).repeat_interleave(per_class).expand(cfg.meta_batch_size, -1).contiguous()
        return x.to(device), y.to(device)

    batch = mamlfast.TaskBatch(*split(cfg.k_shot), *split(cfg.k_query))
    return cfg, lambda: meta_step(batch, args.epoch)


def parse_configuration(configuration: str) -> tuple[str, bool, bool]:
    """"backend[+graphs][+recompute]" -> (backend, graphs, recompute)."""
    backend, *options = configuration.split("+")
    unknown = set(options) - {"graphs", "recompute"}
    if unknown:
        raise SystemExit(f"unknown option(s) {', '.join(sorted(unknown))} in configuration {configuration!r}")
    return backend, "graphs" in options, "recompute" in options


def peak_memory(args, configuration: str) -> int:
    """Peak memory of ``configuration``'s meta-iterations, measured in a fresh process of its own."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", configuration, "--preset", args.preset,
               "--variant", args.variant, "--epoch", str(args.epoch), "--device", args.device,
               "--warmup", str(args.warmup)]
    for option, value in (("--tasks", args.tasks), ("--inner-steps", args.inner_steps), ("--threads", args.threads)):
        if value:
            command += [option, str(value)]
    # A fixed threshold makes glibc return every freed block of 128 KiB or more at once, so that
    # resident memory follows the tensors alive, not what the allocator keeps from earlier peaks.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    return int(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.split()[-1])


def memory_probe(args) -> None:
    _, meta_iteration = build(args, args.memory_probe)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        importlib.import_module("torch._dynamo")  # code that checkpointing loads on first use, not iteration memory
        # Writing 5 to clear_refs resets the resident-memory high-water mark to the current size.
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _proc_status_bytes("VmRSS")
    for _ in range(args.warmup + 2):
        meta_iteration()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        print(torch.cuda.max_memory_allocated(device) - before)
    else:
        print(_proc_status_bytes("VmHWM") - before)


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
    configurations = ["loop"] + [c for c in args.backends.split(",") if c and c != "loop"]
    built = {c: build(args, c) for c in configurations}
    cfg = built["loop"][0]
    times = time_interleaved({c: fn for c, (_, fn) in built.items()}, device, args.repeats, args.warmup)
    loop_ms = median(times["loop"])
    rows = []
    for configuration in configurations:
        backend, graphs, recompute = parse_configuration(configuration)
        ms = median(times[configuration])
        rows.append(dict(preset=args.preset, variant=args.variant, backend=backend, graphs=graphs,
                         recompute=recompute, epoch=args.epoch, tasks=cfg.meta_batch_size,
                         inner_steps=cfg.inner_steps, median_ms=ms,
                         tasks_per_second=cfg.meta_batch_size / ms * 1e3,
                         peak_memory_mb=peak_memory(args, configuration) / 2**20,
                         speedup_over_loop=loop_ms / ms, all_ms=times[configuration]))
    result = dict(device=device_name(device), **versions(),
                  threads=torch.get_num_threads(), repeats=args.repeats, warmup=args.warmup, rows=rows)
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['threads']} CPU threads, "
          f"median of {result['repeats']} after {result['warmup']} warm-up")
    print(f"{'preset':<20} {'backend':<8} {'graphs':<6} {'recompute':<9} {'ms/iter':>9} {'tasks/s':>9} {'peak MiB':>9} "
          f"{'vs loop':>8}")
    for row in result["rows"]:
        print(f"{row['preset']:<20} {row['backend']:<8} {'yes' if row['graphs'] else 'no':<6} "
              f"{'yes' if row['recompute'] else 'no':<9} {row['median_ms']:>9.2f} "
              f"{row['tasks_per_second']:>9.1f} {row['peak_memory_mb']:>9.0f} {row['speedup_over_loop']:>7.2f}x")


if __name__ == "__main__":
    main()
