"""Milliseconds and peak memory of one meta-iteration per configuration, with the speed-ups over ``loop`` and ``func``.

What is measured, and how, is ``mamlfast.speed``'s (``mamlfast check`` measures the same): a
configuration is a backend (loop, torch, triton, cuda, auto), with ``+graphs`` to replay the
iteration from a CUDA graph and ``+recompute`` to recompute the inner steps in the outer
backward, or ``func``: the same MAML++ written with torch.func (``mamlfast/func_peer.py``), what
users write instead of mamlfast. The two yardsticks, ``loop`` and ``func``, are always measured,
and every configuration is reported as a speed-up over both. A configuration that fails becomes
a row with its error; a run stopped by SIGTERM or Ctrl-C still reports the medians of what it
measured. ``--profile`` prints instead where one meta-iteration's time goes, operator by operator.

    python benchmarks/meta_step.py --preset omniglot-20w1s --backends torch,auto,auto+graphs --json out.json
    python benchmarks/meta_step.py --preset omniglot-20w1s --backends auto,auto+graphs --profile
"""

from __future__ import annotations

import argparse
import ast
import gc
import os
import signal
import sys
import traceback

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mamlfast.files import write_json  # noqa: E402
from mamlfast.speed import CAPTURE_WARMUP, YARDSTICKS, Workload, describe_known, known, measure, prepare  # noqa: E402
from mamlfast.timing import device_name, one_line, versions  # noqa: E402
from tables import meta_step_table, profile_table  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="omniglot-20w1s")
    parser.add_argument("--variant", default="maml++")
    parser.add_argument("--backends", default="torch", help="comma-separated configurations: func or a backend, "
                                                            "optionally +graphs and/or +recompute; loop and func "
                                                            "are always added")
    parser.add_argument("--epoch", type=int, default=50, help="sets MSL weights and derivative order (50: second order)")
    parser.add_argument("--tasks", type=int, default=None, help="meta-batch size (default: the preset's)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="any MAMLConfig field, e.g. --override num_filters=32 (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help=f"per configuration; +graphs needs {CAPTURE_WARMUP} "
                                                              "(2 eager iterations, then the capture)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory (on the CPU: a process each)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one meta-iteration of each configuration given (no yardsticks) instead")
    parser.add_argument("--top", type=int, default=15, help="operators listed per profile")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    args.configurations = [c for c in args.backends.split(",") if c]
    if not args.profile:
        args.configurations = list(YARDSTICKS) + [c for c in args.configurations if c not in YARDSTICKS]
    for configuration in args.configurations:
        if not known(configuration):
            parser.error(f"unknown configuration {configuration!r}: {describe_known()}")
    try:
        args.workload = Workload(args.preset, args.variant, args.epoch, args.tasks,
                                 dict(_field_value(item) for item in args.override), args.device, args.warmup,
                                 args.threads)
        args.workload.config("loop")
    except ValueError as error:
        parser.error(str(error))
    return args


def _field_value(item: str) -> tuple[str, object]:
    field, equals, text = item.partition("=")
    if not equals:
        raise ValueError(f"--override {item!r}: expected FIELD=VALUE")
    try:
        return field, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return field, text


def profile(args) -> dict:
    """Self time of the operators (and, on a GPU, kernels) of one meta-iteration per configuration."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    profiles = {}
    try:
        for configuration in args.configurations:
            profiles[configuration] = _profile_one(args, configuration, activities)
            gc.collect()  # the last configuration's memory, before the next
    except KeyboardInterrupt:
        pass
    for configuration in args.configurations:
        profiles.setdefault(configuration, dict(error="interrupted before it was profiled"))
    return dict(device=device_name(device), **versions(), preset=args.preset, overrides=args.workload.overrides,
                clock="device" if on_gpu else "CPU", top=args.top, profiles=profiles)


def _profile_one(args, configuration: str, activities) -> dict:
    on_gpu = torch.device(args.device).type == "cuda"
    try:
        prepared = prepare(args.workload, configuration)
        with torch.profiler.profile(activities=activities) as profiler:
            prepared.iterate()
            if on_gpu:
                torch.cuda.synchronize()
        if prepared.step is not None and prepared.step.cfg.cuda_graphs and not prepared.step.graph_replayed:
            raise RuntimeError(f"CUDA graphs asked for, not replayed: {prepared.step.eager_reason}")
        return _top_ops(profiler.key_averages(), on_gpu, args.top)
    except Exception as error:
        traceback.print_exc()
        return dict(error=one_line(error))


def _top_ops(averages, on_gpu: bool, top: int) -> dict:
    """On a GPU the kernels (and copies) by their time on the device; on the CPU the operators by self time."""
    def self_us(event):
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    # On a GPU, a CPU operator's self device time is that of the kernels it launched: count the kernels only.
    events = [e for e in averages if self_us(e) > 0 and (e.device_type != DeviceType.CPU) == on_gpu]
    events.sort(key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    ops = [dict(name=e.key, calls=e.count, self_ms=self_us(e) / 1e3, share=self_us(e) / total) for e in events[:top]]
    return dict(error=None, total_ms=total / 1e3, ops=ops)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = profile(args) if args.profile else measure(args.workload, args.configurations, args.repeats,
                                                         memory=not args.no_memory)
    print("\n".join(profile_table(result) if args.profile else meta_step_table(result)), flush=True)
    if args.json:
        write_json(args.json, result)
    return result


def failed(result: dict) -> bool:
    """Whether anything asked for went unmeasured."""
    if "profiles" in result:
        return any(p["error"] for p in result["profiles"].values())
    return result.get("interrupted", False) or any(row["error"] for row in result.get("rows", []))


if __name__ == "__main__":
    # A timeout's SIGTERM stops the run as Ctrl-C does: what was measured is still reported.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(1 if failed(main()) else 0)
