"""Evaluation speed and peak memory against the number of tasks adapted at once.

Evaluation (``MAMLPlusPlus.predict``: first-order adaptation to each support set, then the
query logits) runs its fixed tasks in batches of ``chunk`` tasks; ``mamlfast.train.eval_chunk``
picks the chunk per device. This benchmark times the same tasks at several chunk sizes, and
with the per-task reference (``loop``), taking turns in one run, and measures each
configuration's peak memory in a fresh process of its own (GPU: allocated by torch; CPU:
resident). ``auto`` is the chunk that ``eval_chunk`` picks.

    python benchmarks/eval_chunk.py --preset omniglot-5w1s --chunks 1,4,8,16,32,133,auto --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import mamlfast
from mamlfast.files import write_json
from mamlfast.memory import held_bytes, probe
from mamlfast.timing import device_name, median, time_interleaved, versions
from mamlfast.train import eval_chunk


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-5w1s")
    parser.add_argument("--chunks", default="1,4,8,16,32,auto", help="comma-separated tasks per batch, "
                                                                      "'auto' (eval_chunk's pick) or 'loop'")
    parser.add_argument("--tasks", type=int, default=64, help="tasks evaluated per timed repetition")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_chunk(configuration: str, cfg: mamlfast.MAMLConfig, device: torch.device) -> int:
    """Tasks per batch of ``configuration``: a number, ``auto`` or ``loop`` (one at a time)."""
    if configuration == "auto":
        return eval_chunk(cfg, device)
    return 1 if configuration == "loop" else int(configuration)


def build(args, configuration: str):
    """Evaluation of ``args.tasks`` random tasks in batches of ``configuration``'s size."""
    cfg = mamlfast.MAMLConfig.preset(args.preset, backend="loop" if configuration == "loop" else "auto")
    device = torch.device(args.device)
    torch.manual_seed(0)
    learner = mamlfast.MAMLPlusPlus(cfg).to(device).eval()
    chunk = min(resolve_chunk(configuration, cfg, device), args.tasks)
    generator = torch.Generator().manual_seed(0)

    def split(tasks, per_class):
        x = torch.randn(tasks, cfg.n_way * per_class, cfg.image_channels, cfg.image_size, cfg.image_size,
                        generator=generator)
        y = torch.arange(cfg.n_way).repeat_interleave(per_class).expand(tasks, -1).contiguous()
        return x.to(device), y.to(device)

    (x_support, y_support), (x_query, _) = split(args.tasks, cfg.k_shot), split(args.tasks, cfg.k_query)

    def evaluate():
        for start in range(0, args.tasks, chunk):
            learner.predict(x_support[start:start + chunk], y_support[start:start + chunk],
                            x_query[start:start + chunk]).argmax(-1)

    return cfg, chunk, evaluate


def memory_probe(args) -> None:
    _, _, evaluate = build(args, args.memory_probe)
    print(held_bytes(evaluate, torch.device(args.device)))


def peak_memory(args, configuration: str) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", configuration, "--preset", args.preset,
               "--tasks", str(args.tasks), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return probe(command)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return {}
    device = torch.device(args.device)
    configurations = list(dict.fromkeys(c for c in args.chunks.split(",") if c))
    built = {c: build(args, c) for c in configurations}
    times = time_interleaved({c: fn for c, (_, _, fn) in built.items()}, device, args.repeats, args.warmup)
    slowest = max(median(t) for t in times.values())
    rows = []
    for configuration in configurations:
        cfg, chunk, _ = built[configuration]
        ms_per_task = median(times[configuration]) / args.tasks
        rows.append(dict(preset=args.preset, configuration=configuration, chunk=chunk, ms_per_task=ms_per_task,
                         seconds_per_600_tasks=ms_per_task * 0.6,
                         speedup_over_slowest=slowest / median(times[configuration]),
                         peak_memory_mb=None if args.no_memory else peak_memory(args, configuration) / 2**20,
                         all_ms=times[configuration]))
    result = dict(device=device_name(device), **versions(), threads=torch.get_num_threads(), tasks=args.tasks,
                  repeats=args.repeats, warmup=args.warmup, load_average=os.getloadavg(), rows=rows)
    print_table(result)
    if args.json:
        write_json(args.json, result)
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}, torch {result['torch']}, {result['threads']} CPU threads, {result['tasks']} tasks "
          f"per repetition, median of {result['repeats']} after {result['warmup']} warm-up; "
          f"load average {result['load_average'][0]:.1f}")
    print(f"{'preset':<20} {'chunk':<10} {'ms/task':>8} {'s/600':>7} {'peak MiB':>9} {'vs slowest':>10}")
    for row in result["rows"]:
        name = row["configuration"] if row["configuration"] in ("auto", "loop") else ""
        chunk = f"{row['chunk']}{f' ({name})' if name else ''}"
        memory = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        print(f"{row['preset']:<20} {chunk:<10} {row['ms_per_task']:>8.2f} {row['seconds_per_600_tasks']:>7.1f} "
              f"{memory:>9} {row['speedup_over_slowest']:>9.2f}x")


if __name__ == "__main__":
    main()
