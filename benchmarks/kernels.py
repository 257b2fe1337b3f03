"""Time of each hot op (forward, backward, double backward) per backend, and its bandwidth.

Shapes are those of a meta-batch's support forward: the activations entering each stage's
batch norm and max pooling, [N*K, B*F, H, W], each stage's grouped convolution, and the flat
[B, P] buffer of the LSLR update. Every phase is timed through autograd, as the learner runs it.
Achieved bandwidth counts the bytes each phase must move at least, and is compared with a
device-to-device copy measured in the same run; the convolutions, bound by arithmetic, get no
bandwidth. The cuda and triton backends' batch norm is timed in each kernel variant asked for
(``ops.batch_norm.KERNEL_VARIANTS``), beside the default one, as backend "cuda+overlapped".

Rows are written to --json as each case is measured; a run stopped by SIGTERM or Ctrl-C keeps
them, says it was interrupted, and exits 1.

    python benchmarks/kernels.py --presets omniglot-20w1s,mini-imagenet-5w1s --json out.json
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch

import mamlfast
from mamlfast import ops
from mamlfast.files import write_json
from mamlfast.ops.batch_norm import KERNEL_VARIANTS
from mamlfast.speed import op_cases
from mamlfast.timing import device_name, median, time_interleaved, versions

# tensors of the activations' size each phase reads or writes, at least, per op; the byte per window of
# argmax is not counted; the convolutions, bound by arithmetic, get no bandwidth
TRAFFIC = {
    "batch norm": {"forward": 2, "backward": 3, "double backward": 5},
    "lslr update": {"forward": 3, "backward": 3, "double backward": 4},
    "max pool": {"forward": 1.25, "backward": 1.25, "double backward": 1.25},
    "conv": {"forward": None, "backward": None, "double backward": None},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="omniglot-20w1s,mini-imagenet-5w1s")
    parser.add_argument("--backends", default="torch,cpp,triton,cuda")
    parser.add_argument("--variants", default=",".join(KERNEL_VARIANTS),
                        help="batch-norm kernel variants of the cuda and triton backends")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in KERNEL_VARIANTS]
    if unknown:
        parser.error(f"unknown kernel variant {unknown[0]!r}: choose from {', '.join(KERNEL_VARIANTS)}")
    return args


def copy_ms(numel, device, repeats, warmup):
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    return median(time_interleaved({"copy": lambda: target.copy_(source)}, device, repeats, warmup)["copy"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    availability = ops.availability(device)
    backends = [b for b in args.backends.split(",") if availability[b] is None]
    for b in args.backends.split(","):
        if availability[b] is not None:
            print(f"skipping {b}: {availability[b]}")
    rows = []
    result = dict(device=device_name(device), **versions(), threads=torch.get_num_threads(),
                  repeats=args.repeats, interrupted=False, rows=rows)

    def save():
        if args.json:
            write_json(args.json, result)

    try:
        measure(args, device, backends, rows, save)
    except KeyboardInterrupt:
        result["interrupted"] = True
    print_table(result)
    save()
    return result


def measure(args, device, backends: list[str], rows: list[dict], save) -> None:
    """Appends a row per case, phase and configuration to ``rows``, calling ``save`` after each case."""
    for preset in args.presets.split(","):
        for case in op_cases(mamlfast.MAMLConfig.preset(preset), backends, device, tuple(args.variants)):
            for label, error in case.errors.items():
                print(f"{case.label}: {label} failed: {error}")
            traffic = TRAFFIC[case.kind]
            if any(traffic.values()):
                copy = copy_ms(case.numel, device, args.repeats, args.warmup)
                copy_bandwidth = 2 * case.numel * 4 / copy / 1e6  # GB/s: read and write of float32
            for phase, tensors in traffic.items():
                calls = {label: phases[phase] for label, phases in case.phases.items()}
                times = time_interleaved(calls, device, args.repeats, args.warmup)
                for label, values in times.items():
                    backend, _, variant = label.partition("+")
                    ms = median(values)
                    bandwidth = tensors * case.numel * 4 / ms / 1e6 if tensors else None
                    of_copy = bandwidth / copy_bandwidth if tensors else None
                    rows.append(dict(preset=preset, op=case.label, phase=phase, backend=backend,
                                     variant=variant or "default", median_ms=ms, gb_per_s=bandwidth,
                                     fraction_of_copy=of_copy,
                                     speedup_over_torch=median(times["torch"]) / ms if "torch" in times else None))
            save()


def print_table(result: dict) -> None:
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['threads']} CPU threads, "
          f"median of {result['repeats']}")
    print(f"{'preset':<19} {'op':<34} {'phase':<16} {'backend':<7} {'variant':<10} {'ms':>8} {'GB/s':>7} "
          f"{'of copy':>8} {'vs torch':>9}")
    for r in result["rows"]:
        speedup = f"{r['speedup_over_torch']:.2f}x" if r["speedup_over_torch"] else ""
        bandwidth = f"{r['gb_per_s']:>7.1f} {r['fraction_of_copy']:>7.0%}" if r["gb_per_s"] else f"{'':>7} {'':>8}"
        print(f"{r['preset']:<19} {r['op']:<34} {r['phase']:<16} {r['backend']:<7} {r['variant']:<10} "
              f"{r['median_ms']:>8.3f} {bandwidth} {speedup:>9}")
    if result["interrupted"]:
        print("interrupted: the rows above are what was measured")


if __name__ == "__main__":
    # A timeout's SIGTERM stops the run as Ctrl-C does: what was measured is still written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(1 if main()["interrupted"] else 0)
