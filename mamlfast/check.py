"""``mamlfast check``: whether mamlfast computes right, and how fast, on this machine.

For every backend usable on the device (or those asked for):

- correctness: each fused backend's self-check, run afresh in each dtype (float32 and float64;
  float16 and bfloat16 on a GPU): each op's values, first and second derivatives, and one
  meta-iteration, against the torch backend in float64, with the largest absolute and relative
  errors and a verdict (``mamlfast.ops.self_check``); agreement is recorded as a self-check's is;
- speed of each op (forward, backward, double backward) at the preset's shapes, per backend;
- speed and peak memory of a second-order meta-iteration of the preset (``mamlfast.speed``) for
  loop, the torch.func peer, torch and each fused backend, with and without CUDA graphs on a GPU.

The result is ok when every backend checked agrees with torch in every dtype and every one of them
ran its timings without an error.
"""

from __future__ import annotations

import platform

import torch
from tqdm import tqdm

from . import __version__
from .files import write_json
from .ops import OP_BACKENDS, availability, self_check
from .ops.comparison import dtype_name
from .ops.phases import PHASES
from .progress import bar as progress_bar
from .speed import CAPTURE_WARMUP, Workload, measure, op_cases
from .timing import device_name, median, time_interleaved, versions

DEFAULT_PRESETS = {"cuda": "omniglot-20w1s", "cpu": "omniglot-5w1s"}
YARDSTICKS = ("loop", "func")
BACKENDS = YARDSTICKS + OP_BACKENDS
OP_WARMUP = 2


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    halves = [torch.float16, torch.bfloat16] if device.type == "cuda" else []
    return [torch.float32, torch.float64, *halves]


def chosen_backends(requested: str | None, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The backends to check (in ``BACKENDS``' order), and those left out as unusable, with why.
    Without ``requested`` (a comma-separated list), every usable one; a backend asked for by name
    must be usable."""
    reasons = {name: reason for name, reason in availability(device).items() if reason}
    if requested is None:
        return [b for b in BACKENDS if b not in reasons], reasons
    names = [name.strip() for name in requested.split(",") if name.strip()]
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"--backends: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        if name in reasons:
            raise ValueError(f"--backends: {name} cannot run on {device}: {reasons[name]}")
    if not names:
        raise ValueError("--backends: give at least one backend")
    return [b for b in BACKENDS if b in names], {}


def run(device: torch.device, preset: str | None = None, backends: str | None = None, *, repeats: int = 10,
        tasks: int | None = None, memory: bool = True, progress: bool = True, json_path: str | None = None) -> int:
    """The whole check: prints its tables, writes ``json_path`` if given; 0 if ok, else 1."""
    chosen, unusable = chosen_backends(backends, device)
    preset = preset or DEFAULT_PRESETS[device.type]
    workload = Workload(preset, tasks=tasks, device=str(device),
                        warmup=CAPTURE_WARMUP if device.type == "cuda" else 1)
    workload.config("torch")  # a bad --tasks is an error before anything runs
    fused = [b for b in chosen if b in self_check.FUSED]
    op_backends = [b for b in chosen if b in OP_BACKENDS]
    configurations = _configurations(chosen, device)
    steps = (len(fused) * len(dtypes_for(device))
             + len(configurations) * (workload.warmup + repeats + int(memory and device.type == "cpu")))
    with progress_bar(total=steps, desc="mamlfast check", leave=False, disable=not progress) as bar:
        correctness = _correctness(fused, device, bar)
        # built after the checks: building runs each backend's ops once
        cases = op_cases(workload.config("torch"), op_backends, device) if op_backends else []
        bar.total += len(cases) * len(PHASES)
        op_speed = _op_speed(cases, device, repeats, bar)
        bar.set_description("meta-iterations")
        meta = measure(workload, configurations, repeats, memory=memory, progress=lambda _: bar.update())
    result = dict(ok=_ok(correctness, op_speed, meta, fused), device=device_name(device), device_type=device.type,
                  mamlfast=__version__, python=platform.python_version(), **versions(), cuda=torch.version.cuda,
                  threads=torch.get_num_threads(), preset=preset, dtypes=[dtype_name(d) for d in dtypes_for(device)],
                  backends=chosen, unusable=unusable, correctness=correctness,
                  op_speed=dict(repeats=repeats, warmup=OP_WARMUP, rows=op_speed), meta_iteration=meta)
    print("\n".join(report(result)), flush=True)
    if json_path:
        write_json(json_path, result)
    return 0 if result["ok"] else 1


def _configurations(chosen: list[str], device: torch.device) -> list[str]:
    """The meta-iterations timed: the yardsticks, then each op backend, on a GPU also from CUDA graphs."""
    configurations = []
    for backend in chosen:
        configurations.append(backend)
        if device.type == "cuda" and backend in OP_BACKENDS:
            configurations.append(f"{backend}+graphs")
    return configurations


def _correctness(fused: list[str], device: torch.device, bar: tqdm) -> list[dict]:
    """Each fused backend's self-check in each dtype, run now: its comparisons as rows."""
    rows = []
    for backend in fused:
        for dtype in dtypes_for(device):
            bar.set_description(f"checking {backend} in {dtype_name(dtype)}")
            found = self_check.check_now(backend, device, dtype)
            rows += [dict(backend=backend, check_seconds=found.seconds, **comparison.to_dict())
                     for comparison in found.comparisons]
            bar.update()
    return rows


def _op_speed(cases, device: torch.device, repeats: int, bar: tqdm) -> list[dict]:
    """Median milliseconds of each phase of each op, per backend, the backends taking turns."""
    rows = []
    for case in cases:
        bar.set_description(f"timing {case.label}")
        for phase in PHASES:
            errors = dict(case.errors)
            times = time_interleaved({b: phases[phase] for b, phases in case.phases.items()}, device, repeats,
                                     OP_WARMUP, errors=errors)
            medians = {b: median(t) for b, t in times.items() if t and b not in errors}
            for backend in [*case.phases, *case.errors]:
                ms = medians.get(backend)
                rows.append(dict(op=case.label, phase=phase, backend=backend, median_ms=ms, error=errors.get(backend),
                                 speedup_over_torch=medians["torch"] / ms if ms and "torch" in medians else None))
            bar.update()
    return rows


def _ok(correctness: list[dict], op_speed: list[dict], meta: dict, fused: list[str]) -> bool:
    """Every comparison within tolerance, and no fused backend's timing that failed."""
    failed_timings = [row for row in op_speed + meta["rows"] if row["backend"] in fused and row["error"]]
    return all(row["ok"] for row in correctness) and not failed_timings and not meta["interrupted"]


# The report


def report(result: dict) -> list[str]:
    """The check's tables and its verdict, as lines of text."""
    lines = [f"mamlfast {result['mamlfast']} on {result['device']} ({result['device_type']}): torch {result['torch']}, "
             f"triton {result['triton'] or 'not installed'}, {result['threads']} CPU threads"]
    lines += [f"  {name}: not usable here: {reason}" for name, reason in result["unusable"].items()]
    if result["correctness"]:
        lines += ["", "Correctness against the torch backend in float64 (values, first and second derivatives; "
                      "one meta-iteration)"]
        lines += _table(["backend", "dtype", "op", "phase", ">max abs", ">max rel", "tolerance", "verdict"],
                        [[r["backend"], r["dtype"], r["op"], r["phase"], _number(r["abs_error"]),
                          _number(r["rel_error"]), r["tolerance"], _verdict(r)] for r in result["correctness"]])
    speed = result["op_speed"]
    if speed["rows"]:
        lines += ["", f"Each op at {result['preset']}'s shapes, float32: median ms of {speed['repeats']}"]
        lines += _table(["op", "phase", "backend", ">ms", ">vs torch"],
                        [[r["op"], r["phase"], r["backend"], _number(r["median_ms"], "{:.3f}"),
                          r["error"] or _ratio(r["speedup_over_torch"])] for r in speed["rows"]])
    meta = result["meta_iteration"]
    if meta["rows"]:
        first = meta["rows"][0]
        lines += ["", f"Second-order meta-iteration of {result['preset']}, {first['tasks']} tasks: median ms of "
                      f"{meta['repeats']} after {meta['warmup']} warm-up"
                      + (" (interrupted: medians of what was measured)" if meta["interrupted"] else "")]
        lines += _table(["backend", "graphs", ">ms", ">tasks/s", ">peak MiB", ">vs loop", ">vs func", ">vs torch"],
                        [_meta_row(row) for row in meta["rows"]])
    lines += ["", _conclusion(result)]
    return lines


def _meta_row(row: dict) -> list[str]:
    start = [row["backend"], "yes" if row["graphs"] else "no"]
    if row["error"]:
        return start + [f"error: {row['error']}"]
    return start + [_number(row["median_ms"], "{:.1f}"), _number(row["tasks_per_second"], "{:.1f}"),
                    _number(row["peak_memory_mb"], "{:.0f}"), _ratio(row["speedup_over_loop"]),
                    _ratio(row["speedup_over_func"]), _ratio(row["speedup_over_torch"])]


def _conclusion(result: dict) -> str:
    checked = sorted({row["backend"] for row in result["correctness"]})
    if result["ok"]:
        if not checked:
            return "ok: no fused backend to check here"
        return (f"ok: {', '.join(checked)} agree{'s' if len(checked) == 1 else ''} with the torch backend in "
                f"{', '.join(result['dtypes'])}")
    failures = [_named(r["backend"], r["op"], r["phase"], f"({r['dtype']})")
                for r in result["correctness"] if not r["ok"]]
    failures += [_named(r["backend"], r.get("op", "meta-iteration"), r.get("phase"), "timing:", r["error"])
                 for r in result["op_speed"]["rows"] + result["meta_iteration"]["rows"]
                 if r["error"] and r["backend"] in checked]
    return "NOT OK: " + "; ".join(failures or ["interrupted"])


def _named(*parts: str | None) -> str:
    return " ".join(part for part in parts if part)


def _verdict(row: dict) -> str:
    if row["error"]:
        return f"error: {row['error']}"
    return "agrees" if row["ok"] else "DISAGREES"


def _number(value: float | None, form: str = "{:.1e}") -> str:
    return "-" if value is None else form.format(value)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns as wide as their widest cell, a header starting with '>' right-aligned; a row shorter
    than the header ends in a cell that runs on past the columns (an error)."""
    right = [name.startswith(">") for name in header]
    header = [name.lstrip(">") for name in header]

    def aligned(row: list[str]) -> list[str]:
        return row if len(row) == len(header) else row[:-1]

    widths = [max(len(row[i]) for row in [header, *rows] if i < len(aligned(row))) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [cell.rjust(widths[i]) if right[i] else cell.ljust(widths[i]) for i, cell in enumerate(aligned(row))]
        return "  ".join(cells + row[len(cells):]).rstrip()

    return [line(header)] + [line(row) for row in rows]
