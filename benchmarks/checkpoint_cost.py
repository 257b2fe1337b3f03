"""What a checkpoint within an epoch costs training, against a meta-iteration's time.

Rounds interleave three measurements on one trainer, as ``mamlfast train`` builds it: a
meta-iteration alone; the stall of a checkpoint (the time the training thread spends in
``--checkpoint-every``'s save: the finiteness check, the host copy, starting the writer); and a
meta-iteration while that checkpoint is written on its thread (on a CPU the writer competes with
training for the cores); and, for comparison, a checkpoint written on the training thread (the
checksum, serialisation, fsync and rename that the writer thread takes off the critical path).
Medians and ranges over the rounds.

    python benchmarks/checkpoint_cost.py --preset omniglot-5w1s --rounds 30 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import mamlfast
from mamlfast.data import load_dataset
from mamlfast.timing import device_name
from mamlfast.train import Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-5w1s")
    parser.add_argument("--dataset", default="synthetic", help="the data do not change what a checkpoint holds")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = mamlfast.MAMLConfig.preset(args.preset)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(cfg, load_dataset(args.dataset, cfg, args.data_root), args.out or scratch, device=device,
                          progress=False)
        with trainer.own_folder(), trainer.writer:
            times = {"iteration": [], "stall": [], "iteration during a write": [], "written in line": []}
            for round_ in range(args.warmup + args.rounds):
                alone = _timed(trainer.step, device)
                stall = _timed(lambda: trainer._checkpoint(background=True), device)
                during = _timed(trainer.step, device)
                trainer.writer.wait()
                in_line = _timed(trainer._checkpoint, device)
                if round_ >= args.warmup:
                    for name, seconds in zip(times, (alone, stall, during, in_line)):
                        times[name].append(seconds)
        size = os.path.getsize(trainer.checkpoint_dir / "latest.pt")
    print(f"{args.preset} on {device_name(device)}, {torch.get_num_threads()} threads, {args.rounds} rounds:")
    for name, values in times.items():
        print(f"  {name:<26} median {1e3 * statistics.median(values):8.2f} ms "
              f"(range {1e3 * min(values):.2f} to {1e3 * max(values):.2f})")
    iteration = statistics.median(times["iteration"])
    stall = statistics.median(times["stall"])
    slowdown = statistics.median(times["iteration during a write"]) - iteration
    print(f"  a checkpoint stalls training {100 * stall / iteration:.2f}% of a meta-iteration, and slows the one "
          f"during its write by {100 * slowdown / iteration:+.1f}%; every 100 iterations: "
          f"{100 * (stall + max(slowdown, 0)) / (100 * iteration):.3f}% of training time; "
          f"file {size / 2**20:.2f} MiB")


def _timed(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
