"""Milliseconds and peak memory of one meta-iteration per configuration, with the speed-ups over ``loop`` and ``func``.

A meta-iteration is what training repeats (``mamlfast.step.MetaStep``): forward (inner loops
and meta-loss), outer backward, and the Adam step. A configuration is a backend (loop, torch,
triton, cuda, auto), with ``+graphs`` to replay the iteration from a CUDA graph and
``+recompute`` to recompute the inner steps in the outer backward (``MAMLConfig.recompute``),
or ``func``:
the same MAML++ written with torch.func (``func_peer.py``), what users write instead of
mamlfast. The two yardsticks, ``loop`` and ``func``, are always measured, and every
configuration is reported as a speed-up over both.

Each configuration is built and warmed up on its own, then all are timed in one run, taking
turns, and reported as the median of their repetitions. One that fails (a backend that cannot
run, a compile error, a CUDA error, graphs asked for but not replayed, a failed memory probe)
becomes a row with its error and the others go on; a run stopped by SIGTERM or Ctrl-C still
reports the medians of what it measured. Peak memory is the most memory a configuration's
meta-iterations hold beyond its model and batch (Adam's state included): on a GPU the most
allocated by torch during its warm-up, on the CPU the resident memory of a fresh process of
its own. ``--profile`` prints instead where one meta-iteration's time goes, operator by operator.

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
from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mamlfast  # noqa: E402
from func_peer import FuncMAMLPlusPlus, meta_iteration  # noqa: E402
from mamlfast.config import BACKENDS  # noqa: E402
from mamlfast.files import write_json  # noqa: E402
from mamlfast.step import MetaStep, make_optimizer  # noqa: E402
from memory import held_bytes, probe  # noqa: E402
from tables import meta_step_table, profile_table  # noqa: E402
from timing import device_name, median, one_line, time_interleaved, versions  # noqa: E402

YARDSTICKS = ("loop", "func")
OPTIONS = ("graphs", "recompute")  # configuration suffixes: "+graphs", "+recompute"
CAPTURE_WARMUP = 3  # MetaStep's two eager iterations, then the capture


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
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    args.configurations = [c for c in args.backends.split(",") if c]
    if not args.profile:
        args.configurations = list(YARDSTICKS) + [c for c in args.configurations if c not in YARDSTICKS]
    for configuration in args.configurations:
        if not _known(configuration):
            parser.error(f"unknown configuration {configuration!r}: func, loop, or one of "
                         f"{', '.join(b for b in BACKENDS if b != 'loop')}, each optionally "
                         f"{' and/or '.join('+' + option for option in OPTIONS)}")
    try:
        args.overrides = dict(_field_value(item) for item in args.override)
        config(args, "loop")
    except ValueError as error:
        parser.error(str(error))
    return args


def _known(configuration: str) -> bool:
    backend, *options = configuration.split("+")
    if backend in YARDSTICKS:
        return not options
    return backend in BACKENDS and len(set(options)) == len(options) and set(options) <= set(OPTIONS)


def _field_value(item: str) -> tuple[str, object]:
    field, equals, text = item.partition("=")
    if not equals:
        raise ValueError(f"--override {item!r}: expected FIELD=VALUE")
    try:
        return field, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return field, text


def config(args, backend: str, options: tuple[str, ...] = ()) -> mamlfast.MAMLConfig:
    overrides = dict(args.overrides, backend=backend, cuda_graphs="graphs" in options,
                     recompute="recompute" in options)
    if args.tasks:
        overrides["meta_batch_size"] = args.tasks
    return mamlfast.MAMLConfig.preset(args.preset, args.variant, **overrides)


@dataclass
class Prepared:
    """A configuration built and warmed up: its meta-iteration, and its MetaStep (None for func)."""
    iterate: Callable[[], object]
    step: MetaStep | None
    peak_memory: int | None  # bytes, on a GPU; None on the CPU


def build(args, configuration: str) -> tuple[Callable[[], object], MetaStep | None]:
    """A meta-iteration of ``configuration`` on a fixed random meta-batch, all starting from the same weights."""
    backend, *options = configuration.split("+")
    cfg = config(args, "loop" if backend == "func" else backend, tuple(options))
    device = torch.device(args.device)
    torch.manual_seed(0)
    learner = mamlfast.MAMLPlusPlus(cfg).to(device)
    generator = torch.Generator().manual_seed(0)

    def split(per_class):
        x = torch.randn(cfg.meta_batch_size, cfg.n_way * per_class, cfg.image_channels, cfg.image_size,
                        cfg.image_size, generator=generator)
        y = torch.arange(cfg.n_way).repeat_interleave(per_class).expand(cfg.meta_batch_size, -1).contiguous()
        return x.to(device), y.to(device)

    batch = mamlfast.TaskBatch(*split(cfg.k_shot), *split(cfg.k_query))
    if backend == "func":
        peer = FuncMAMLPlusPlus(cfg).to(device).load_learner(learner)
        optimizer = torch.optim.Adam(peer.parameters(), lr=cfg.meta_lr)
        return lambda: meta_iteration(peer, optimizer, batch, args.epoch), None
    meta_step = MetaStep(learner, make_optimizer(learner, cfg, device), cfg, device)
    return lambda: meta_step(batch, args.epoch), meta_step


def prepare(args, configuration: str) -> Prepared:
    """Build and warm up; on a GPU, the peak memory the warm-up allocated beyond the model and batch."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    iterate, step = build(args, configuration)
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    for _ in range(args.warmup):
        iterate()
    if step is not None and step.cfg.cuda_graphs and step.eager_reason:
        raise RuntimeError(f"CUDA graphs asked for, not replayed: {step.eager_reason}")
    if on_gpu:
        torch.cuda.synchronize(device)
    return Prepared(iterate, step, torch.cuda.max_memory_allocated(device) - before if on_gpu else None)


def peak_memory(args, configuration: str) -> int:
    """Peak memory of ``configuration``'s meta-iterations (GPU: allocated by torch; CPU: resident),
    measured in a fresh process of its own."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", configuration, "--preset", args.preset,
               "--variant", args.variant, "--epoch", str(args.epoch), "--device", args.device,
               "--warmup", str(args.warmup)]
    command += [f"--override={item}" for item in args.override]
    for option, value in (("--tasks", args.tasks), ("--threads", args.threads)):
        if value:
            command += [option, str(value)]
    # A fixed threshold makes glibc return every freed block of 128 KiB or more at once, so that
    # resident memory follows the tensors alive, not what the allocator keeps from earlier peaks.
    return probe(command, env=dict(MALLOC_MMAP_THRESHOLD_="131072"))


def memory_probe(args) -> None:
    iterate, _ = build(args, args.memory_probe)
    print(held_bytes(lambda: [iterate() for _ in range(args.warmup + 2)], torch.device(args.device)))


def measure(args) -> dict:
    """Time every configuration; each failure becomes an error row, and an interruption keeps what was measured."""
    device = torch.device(args.device)
    prepared: dict[str, Prepared] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    memory: dict[str, int | None] = {}
    interrupted = False
    try:
        for configuration in args.configurations:
            try:
                prepared[configuration] = prepare(args, configuration)
                memory[configuration] = prepared[configuration].peak_memory
            except Exception as error:
                traceback.print_exc()
                errors[configuration] = one_line(error)
        replays = {c: p.step.replays for c, p in prepared.items() if p.step is not None and p.step.cfg.cuda_graphs}
        time_interleaved({c: p.iterate for c, p in prepared.items()}, device, args.repeats, 0,
                         errors=errors, times=times)
        for configuration in replays:
            eager = len(times[configuration]) - (prepared[configuration].step.replays - replays[configuration])
            if eager and configuration not in errors:
                errors[configuration] = (f"CUDA graphs asked for, but {eager} of {len(times[configuration])} timed "
                                         f"meta-iterations ran eagerly: {prepared[configuration].step.eager_reason}")
        if device.type == "cpu" and not args.no_memory:
            for configuration in prepared:
                if configuration not in errors:
                    try:
                        memory[configuration] = peak_memory(args, configuration)
                    except Exception as error:
                        errors[configuration] = one_line(error)
    except KeyboardInterrupt:
        interrupted = True
    for configuration in args.configurations:
        if configuration not in errors and not times.get(configuration):
            errors[configuration] = "interrupted before it was timed"
    return dict(device=device_name(device), **versions(), threads=torch.get_num_threads(), repeats=args.repeats,
                warmup=args.warmup, overrides=args.overrides, interrupted=interrupted,
                rows=_rows(args, errors, times, memory))


def _rows(args, errors: dict[str, str], times: dict[str, list[float]], memory: dict[str, int | None]) -> list[dict]:
    """One row per configuration: its median and speed-ups over the yardsticks, or its error."""
    medians = {c: median(t) for c, t in times.items() if t and c not in errors}
    tasks = config(args, "loop").meta_batch_size
    rows = []
    for configuration in args.configurations:
        backend, *options = configuration.split("+")
        ms = medians.get(configuration)
        peak = memory.get(configuration) if ms and not args.no_memory else None
        speedups = {yardstick: medians[yardstick] / ms if ms and yardstick in medians else None
                    for yardstick in YARDSTICKS}
        rows.append(dict(preset=args.preset, variant=args.variant, backend=backend, graphs="graphs" in options,
                         recompute="recompute" in options, epoch=args.epoch, tasks=tasks, error=errors.get(configuration), median_ms=ms,
                         tasks_per_second=tasks / ms * 1e3 if ms else None,
                         peak_memory_mb=peak / 2**20 if peak is not None else None,
                         speedup_over_loop=speedups["loop"], speedup_over_func=speedups["func"],
                         all_ms=times.get(configuration, [])))
    return rows


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
    return dict(device=device_name(device), **versions(), preset=args.preset, overrides=args.overrides,
                clock="device" if on_gpu else "CPU", top=args.top, profiles=profiles)


def _profile_one(args, configuration: str, activities) -> dict:
    on_gpu = torch.device(args.device).type == "cuda"
    try:
        prepared = prepare(args, configuration)
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
    if args.memory_probe:
        memory_probe(args)
        return {}
    result = profile(args) if args.profile else measure(args)
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
