"""Milliseconds and peak memory of meta-iterations, per configuration, with the speed-ups over the
yardsticks: what ``mamlfast check`` and benchmarks/meta_step.py measure.

A meta-iteration is what training repeats (``mamlfast.step.MetaStep``): forward (inner loops and
meta-loss), outer backward, and the Adam step. A configuration is a backend (loop, torch, cpp,
triton, cuda, auto), with ``+graphs`` to replay the iteration from a CUDA graph and ``+recompute``
to recompute the inner steps in the outer backward (``MAMLConfig.recompute``), or ``func``: the
same MAML++ written with torch.func (``mamlfast.func_peer``), what users write instead of
mamlfast.

Each configuration is built and warmed up on its own, then all are timed in one run, taking
turns, and reported as the median of their repetitions. One that fails (a backend that cannot
run, a compile error, a CUDA error, graphs asked for but not replayed, a failed memory probe)
becomes a row with its error and the others go on; an interrupted run (SIGTERM or Ctrl-C, where
the caller turns SIGTERM into KeyboardInterrupt) still reports the medians of what it measured.
Peak memory is the most memory a configuration's meta-iterations hold beyond its model and batch
(Adam's state included): on a GPU the most allocated by torch during its warm-up, on the CPU the
resident memory of a fresh process of its own (``python -m mamlfast.speed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import traceback
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from .config import BACKENDS, MAMLConfig
from .func_peer import FuncMAMLPlusPlus, meta_iteration
from .learner import MAMLPlusPlus
from .memory import held_bytes, probe
from .ops import batch_norm, conv, lslr, max_pool, phases
from .ops.phases import Phases
from .step import MetaStep, make_optimizer
from .tasks import TaskBatch
from .timing import device_name, median, one_line, time_interleaved, versions

YARDSTICKS = ("loop", "func")
OPTIONS = ("graphs", "recompute")  # configuration suffixes: "+graphs", "+recompute"
CAPTURE_WARMUP = 3  # MetaStep's two eager iterations, then the capture


@dataclass
class Workload:
    """What every configuration runs: a preset's meta-iteration on a fixed random meta-batch."""
    preset: str
    variant: str = "maml++"
    epoch: int = 50  # sets the MSL weights and the derivative order (50: second order)
    tasks: int | None = None  # meta-batch size (default: the preset's)
    overrides: dict = field(default_factory=dict)  # any MAMLConfig fields
    device: str = "cpu"
    warmup: int = 3
    threads: int | None = None  # torch CPU threads of the memory probes' processes

    def config(self, backend: str, options: tuple[str, ...] = ()) -> MAMLConfig:
        overrides = dict(self.overrides, backend=backend, cuda_graphs="graphs" in options,
                         recompute="recompute" in options)
        if self.tasks:
            overrides["meta_batch_size"] = self.tasks
        return MAMLConfig.preset(self.preset, self.variant, **overrides)


def known(configuration: str) -> bool:
    backend, *options = configuration.split("+")
    if backend in YARDSTICKS:
        return not options
    return backend in BACKENDS and len(set(options)) == len(options) and set(options) <= set(OPTIONS)


def describe_known() -> str:
    return (f"func, loop, or one of {', '.join(b for b in BACKENDS if b != 'loop')}, each optionally "
            f"{' and/or '.join('+' + option for option in OPTIONS)}")


@dataclass
class Prepared:
    """A configuration built and warmed up: its meta-iteration, and its MetaStep (None for func)."""
    iterate: Callable[[], object]
    step: MetaStep | None
    peak_memory: int | None  # bytes, on a GPU; None on the CPU


def build(workload: Workload, configuration: str) -> tuple[Callable[[], object], MetaStep | None]:
    """A meta-iteration of ``configuration`` on a fixed random meta-batch, all starting from the same weights."""
    backend, *options = configuration.split("+")
    cfg = workload.config("loop" if backend == "func" else backend, tuple(options))
    device = torch.device(workload.device)
    torch.manual_seed(0)
    learner = MAMLPlusPlus(cfg).to(device)
    generator = torch.Generator().manual_seed(0)

    def split(per_class):
        x = torch.randn(cfg.meta_batch_size, cfg.n_way * per_class, cfg.image_channels, cfg.image_size,
                        cfg.image_size, generator=generator)
        y = torch.arange(cfg.n_way).repeat_interleave(per_class).expand(cfg.meta_batch_size, -1).contiguous()
        return x.to(device), y.to(device)

    batch = TaskBatch(*split(cfg.k_shot), *split(cfg.k_query))
    if backend == "func":
        peer = FuncMAMLPlusPlus(cfg).to(device).load_learner(learner)
        optimizer = torch.optim.Adam(peer.parameters(), lr=cfg.meta_lr)
        return lambda: meta_iteration(peer, optimizer, batch, workload.epoch), None
    meta_step = MetaStep(learner, make_optimizer(learner, cfg, device), cfg, device)
    return lambda: meta_step(batch, workload.epoch), meta_step


def prepare(workload: Workload, configuration: str) -> Prepared:
    """Build and warm up; on a GPU, the peak memory the warm-up allocated beyond the model and batch."""
    device = torch.device(workload.device)
    on_gpu = device.type == "cuda"
    iterate, step = build(workload, configuration)
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    for _ in range(workload.warmup):
        iterate()
    if step is not None and step.cfg.cuda_graphs and step.eager_reason:
        raise RuntimeError(f"CUDA graphs asked for, not replayed: {step.eager_reason}")
    if on_gpu:
        torch.cuda.synchronize(device)
    return Prepared(iterate, step, torch.cuda.max_memory_allocated(device) - before if on_gpu else None)


def peak_memory(workload: Workload, configuration: str) -> int:
    """Peak memory of ``configuration``'s meta-iterations (GPU: allocated by torch; CPU: resident),
    measured in a fresh process of its own."""
    command = [sys.executable, "-m", "mamlfast.speed", json.dumps(dataclasses.asdict(workload)), configuration]
    return probe(command)


def measure(workload: Workload, configurations: list[str], repeats: int, *, memory: bool = True,
            progress: Callable[[str], None] | None = None) -> dict:
    """Time every configuration; each failure becomes an error row, and an interruption keeps what was
    measured. ``progress(configuration)`` is called after each meta-iteration and memory probe."""
    device = torch.device(workload.device)
    prepared: dict[str, Prepared] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {}
    peaks: dict[str, int | None] = {}
    interrupted = False
    tick = progress or (lambda configuration: None)
    try:
        for configuration in configurations:
            try:
                prepared[configuration] = prepare(workload, configuration)
                peaks[configuration] = prepared[configuration].peak_memory
            except Exception as error:
                traceback.print_exc()
                errors[configuration] = one_line(error)
            for _ in range(workload.warmup):
                tick(configuration)
        replays = {c: p.step.replays for c, p in prepared.items() if p.step is not None and p.step.cfg.cuda_graphs}
        time_interleaved({c: p.iterate for c, p in prepared.items()}, device, repeats, 0,
                         errors=errors, times=times, after_each=tick)
        for configuration in replays:
            eager = len(times[configuration]) - (prepared[configuration].step.replays - replays[configuration])
            if eager and configuration not in errors:
                errors[configuration] = (f"CUDA graphs asked for, but {eager} of {len(times[configuration])} timed "
                                         f"meta-iterations ran eagerly: {prepared[configuration].step.eager_reason}")
        if device.type == "cpu" and memory:
            for configuration in prepared:
                if configuration not in errors:
                    try:
                        peaks[configuration] = peak_memory(workload, configuration)
                    except Exception as error:
                        errors[configuration] = one_line(error)
                tick(configuration)
    except KeyboardInterrupt:
        interrupted = True
    for configuration in configurations:
        if configuration not in errors and not times.get(configuration):
            errors[configuration] = "interrupted before it was timed"
    return dict(device=device_name(device), **versions(), threads=torch.get_num_threads(), repeats=repeats,
                warmup=workload.warmup, overrides=workload.overrides, interrupted=interrupted,
                rows=_rows(workload, configurations, errors, times, peaks if memory else {}))


def _rows(workload: Workload, configurations: list[str], errors: dict[str, str], times: dict[str, list[float]],
          peaks: dict[str, int | None]) -> list[dict]:
    """One row per configuration: its median and speed-ups over the yardsticks and torch, or its error."""
    medians = {c: median(t) for c, t in times.items() if t and c not in errors}
    tasks = workload.config("loop").meta_batch_size
    rows = []
    for configuration in configurations:
        backend, *options = configuration.split("+")
        ms = medians.get(configuration)
        peak = peaks.get(configuration) if ms else None
        speedups = {other: medians[other] / ms if ms and other in medians else None for other in (*YARDSTICKS, "torch")}
        rows.append(dict(preset=workload.preset, variant=workload.variant, backend=backend, graphs="graphs" in options,
                         recompute="recompute" in options, epoch=workload.epoch, tasks=tasks,
                         error=errors.get(configuration), median_ms=ms,
                         tasks_per_second=tasks / ms * 1e3 if ms else None,
                         peak_memory_mb=peak / 2**20 if peak is not None else None,
                         speedup_over_loop=speedups["loop"], speedup_over_func=speedups["func"],
                         speedup_over_torch=speedups["torch"], all_ms=times.get(configuration, [])))
    return rows


def stage_shapes(cfg: MAMLConfig) -> list[tuple[int, int, int, int]]:
    """[N*K, B*F, H, W] entering each stage's batch norm and max pooling in the support forward."""
    shapes, size = [], cfg.image_size
    for _ in range(cfg.num_stages):
        shapes.append((cfg.n_way * cfg.k_shot, cfg.meta_batch_size * cfg.num_filters, size, size))
        size //= 2
    return shapes


@dataclass
class OpCase:
    """One hot op at one shape of a meta-batch's support forward: its phases built per backend, or
    why they could not be (the error, in one line)."""
    kind: str  # batch norm, max pool, conv, lslr update
    label: str
    numel: int  # values of the activation (the flat buffer, for the LSLR update)
    phases: dict[str, Phases]
    errors: dict[str, str]


def op_cases(cfg: MAMLConfig, backends: list[str], device: torch.device,
             variants: tuple[str, ...] = ("default",)) -> list[OpCase]:
    """The hot ops at ``cfg``'s shapes, for each of ``backends`` that has code of its own for the op
    and for torch; pooling and the convolution only where a backend given has code of its own. Batch
    norm also in each other kernel variant of ``variants`` on the cuda and triton backends, labelled
    "cuda+overlapped"."""
    def case(kind: str, shape, module, build: Callable[..., Phases], variants=("default",)) -> OpCase:
        built, errors = {}, {}
        for backend in (b for b in backends if b == "torch" or b in module.FUSED_BACKENDS):
            others = [v for v in variants if v != "default"] if backend in ("cuda", "triton") else []
            for label, options in {backend: {}, **{f"{backend}+{v}": dict(kernel_variant=v) for v in others}}.items():
                try:
                    built[label] = build(backend, **options)
                except Exception as error:
                    errors[label] = one_line(error)
        return OpCase(kind, f"{kind} {list(shape)}", math.prod(shape), built, errors)

    def fused(module) -> bool:
        return any(b in module.FUSED_BACKENDS for b in backends)

    shapes = stage_shapes(cfg)
    cases = [case("batch norm", shape, batch_norm, partial(phases.batch_norm_phases, shape=shape,
                                                           channels=cfg.num_filters, device=device), variants)
             for shape in shapes]
    if fused(max_pool):
        cases += [case("max pool", shape, max_pool, partial(phases.max_pool_phases, shape=shape, device=device))
                  for shape in shapes]
    if fused(conv):
        for stage, shape in enumerate(shapes):
            channels = cfg.image_channels if stage == 0 else cfg.num_filters
            x_shape = (shape[0], cfg.meta_batch_size * channels, shape[2], shape[3])
            cases.append(case("conv", shape, conv, partial(phases.conv_phases, x_shape=x_shape, out_channels=shape[1],
                                                           groups=cfg.meta_batch_size, device=device,
                                                           input_needs_grad=stage > 0)))
    sizes = [p.numel() for p in MAMLPlusPlus(cfg).net.adapted_parameters().values()]
    cases.append(case("lslr update", (cfg.meta_batch_size, sum(sizes)), lslr,
                      partial(phases.lslr_phases, sizes=sizes, tasks=cfg.meta_batch_size, device=device)))
    return cases


def _memory_probe(workload_json: str, configuration: str) -> None:
    """In a fresh process: the peak memory of ``configuration``'s meta-iterations, printed last."""
    workload = Workload(**json.loads(workload_json))
    if workload.threads:
        torch.set_num_threads(workload.threads)
    iterate, _ = build(workload, configuration)
    print(held_bytes(lambda: [iterate() for _ in range(workload.warmup + 2)], torch.device(workload.device)))


if __name__ == "__main__":
    _memory_probe(*sys.argv[1:])
