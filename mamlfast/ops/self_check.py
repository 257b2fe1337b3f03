"""Each fused backend checked against the torch backend on the device it runs on, before it first
runs there.

The first time a process resolves a fused backend (cpp, triton, cuda) for a device and dtype, the
checks run there: each fused op's values and first and second derivatives (``agreement``), and the
checks the layers above add (``add_check``: ``mamlfast.learner_check`` adds one small
meta-iteration). Agreement is recorded in the cache folder (``MAMLFAST_CACHE``), under a key of
everything that could change the answer (``record_key``), written atomically, so that a later
process with the same key reads it instead; each rank of a run checks its own device. A
disagreement, or a crash inside a check, is never recorded: every process checks again and says
so. ``MAMLFAST_SELF_CHECK=0`` skips the checks. Checks never run inside CUDA graph capture.

After the first time, a verdict costs one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..files import cache_dir, first_line, write_json
from ..timing import processor_name
from .comparison import Comparison, crashed, dtype_name

log = logging.getLogger(__name__)

SWITCH = "MAMLFAST_SELF_CHECK"
FUSED = ("cpp", "triton", "cuda")
Check = Callable[[str, torch.device, torch.dtype], list[Comparison]]


@dataclass
class Verdict:
    """Whether ``backend`` agrees with the torch backend on ``device`` in ``dtype``, and how that
    was found: "checked" (in this process), "recorded" (read from the cache), "skipped"
    (``MAMLFAST_SELF_CHECK=0``) or "not needed" (the torch backend, shapes on the meta device)."""
    backend: str
    device: str
    dtype: str
    agrees: bool
    how: str
    comparisons: list[Comparison] = field(default_factory=list)
    seconds: float = 0.0
    checked_at: str | None = None

    def failure(self) -> Comparison | None:
        """The first comparison that failed, None where all agreed."""
        return next((c for c in self.comparisons if not c.ok), None)

    def problem(self) -> str:
        """The disagreement in one line: the backend, the device, the op, the error and the tolerance."""
        return (f"backend {self.backend!r} disagrees with the torch backend on {self.device}: "
                f"{self.failure().describe()}")

    def describe(self) -> str:
        if not self.agrees:
            return f"disagrees with torch: {self.failure().describe()}"
        if self.how == "recorded":
            return f"agrees with torch (checked {self.checked_at}, recorded)"
        if self.how == "checked":
            return f"agrees with torch (checked now, {self.seconds:.2f} s)"
        return {"skipped": f"not checked ({SWITCH}=0)", "not needed": "the reference"}[self.how]


class UncheckedInCapture(RuntimeError):
    """A fused backend met for the first time inside CUDA graph capture, where no check can run."""


_checks: dict[str, Check] = {}
_verdicts: dict[tuple[str, torch.device, torch.dtype], Verdict] = {}
_warned: set = set()  # the disagreements auto passed over, and SWITCH, once said


def add_check(name: str, check: Check) -> None:
    """Run ``check(backend, device, dtype)`` in every self-check, after the ops' own; its name
    enters the record's key, so that records made without it are not taken for checks with it."""
    _checks[name] = check


def forget() -> None:
    """Drop this process's verdicts: the next use of each backend reads its record or checks again."""
    _verdicts.clear()
    _warned.clear()


def verdict(backend: str, device: torch.device, dtype: torch.dtype) -> Verdict:
    """The verdict on ``backend`` for ``device`` and ``dtype``: found once per process, then remembered."""
    found = _verdicts.get((backend, device, dtype))
    return found if found is not None else _decide(backend, device, dtype)


def warn_fallback(found: Verdict, instead: str) -> None:
    """Say once per process that ``auto`` passed over a backend that disagrees."""
    key = (found.backend, found.device, found.dtype)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s; backend='auto' takes %r instead", found.problem(), instead)


def _decide(backend: str, device: torch.device, dtype: torch.dtype) -> Verdict:
    if device.type == "cuda" and device.index is None:  # the current device: remembered under both names
        _verdicts[backend, device, dtype] = found = verdict(backend, torch.device("cuda", torch.cuda.current_device()),
                                                            dtype)
        return found
    found = known(backend, device, dtype)
    if found is not None:
        return found
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise UncheckedInCapture(
            f"backend {backend!r} has not been checked on {_where(device, dtype)} yet, and checks never run inside "
            f"CUDA graph capture: run one step eagerly before capturing (as warm-up does), or set {SWITCH}=0")
    return check_now(backend, device, dtype)


def known(backend: str, device: torch.device, dtype: torch.dtype) -> Verdict | None:
    """The verdict found without checking: this process's, one that needs no check (the torch backend,
    the meta device, checks switched off), else the record's; None where a check has yet to run."""
    key = (backend, device, dtype)
    if key in _verdicts:
        return _verdicts[key]
    where = _where(device, dtype)
    if backend not in FUSED or device.type == "meta":
        return _verdicts.setdefault(key, Verdict(backend, where, dtype_name(dtype), True, "not needed"))
    if os.environ.get(SWITCH) == "0":
        if SWITCH not in _warned:  # once per process
            _warned.add(SWITCH)
            log.warning("%s=0: the fused backends run unchecked against the torch backend", SWITCH)
        return _verdicts.setdefault(key, Verdict(backend, where, dtype_name(dtype), True, "skipped"))
    recorded = _read_record(record_path(backend, device, dtype), record_key(backend, device, dtype))
    if recorded is None:
        return None
    found = _verdicts[key] = Verdict(backend, where, dtype_name(dtype), True, "recorded",
                                     checked_at=recorded["checked_at"])
    return found


def check_now(backend: str, device: torch.device, dtype: torch.dtype) -> Verdict:
    """Check ``backend`` on ``device`` in ``dtype`` now, whatever is recorded; record agreement, and
    remember the verdict for this process."""
    found = run_checks(backend, device, dtype)
    if found.agrees:
        _write_record(record_path(backend, device, dtype), record_key(backend, device, dtype), found)
    _verdicts[backend, device, dtype] = found
    return found


def run_checks(backend: str, device: torch.device, dtype: torch.dtype) -> Verdict:
    """Every check of ``backend`` on ``device`` in ``dtype``, now, whatever is recorded; a check that
    raises (a CUDA error the process survives included) is a failed comparison, not an exception."""
    key = (backend, device, dtype)
    where = _where(device, dtype)
    start = time.perf_counter()
    comparisons = []
    # while the checks run, their own calls of the backend resolve without checking again
    _verdicts[key] = Verdict(backend, where, dtype_name(dtype), True, "checking")
    try:
        with _isolated(device):
            for name, check in {"ops": _compare_ops, **_checks}.items():
                comparisons += _guarded(name, check, backend, device, dtype)
    finally:
        del _verdicts[key]
    agrees = all(c.ok for c in comparisons)
    return Verdict(backend, where, dtype_name(dtype), agrees, "checked", comparisons,
                   time.perf_counter() - start, _now())


def _compare_ops(backend: str, device: torch.device, dtype: torch.dtype) -> list[Comparison]:
    from .agreement import compare_ops  # imports the ops, which import this module through backends
    return compare_ops(backend, device, dtype)


def _guarded(name: str, check: Check, backend: str, device: torch.device, dtype: torch.dtype) -> list[Comparison]:
    try:
        comparisons = check(backend, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous CUDA error belongs to this check
        return comparisons
    except Exception as error:
        return [crashed(name, "check", dtype, error, "-")]


@contextlib.contextmanager
def _isolated(device: torch.device):
    """The checks' own grad mode and device, without autocast or the caller's saved-tensor hooks
    (a recomputed region's, a memory estimate's: the innermost hooks apply), leaving the random
    number generators as they were: a run gives the same numbers whether or not its backend was checked."""
    cuda = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor))
        if cuda:
            stack.enter_context(torch.cuda.device(device))
            stack.enter_context(_without_tf32())
        else:
            stack.enter_context(_one_thread())
        yield


@contextlib.contextmanager
def _one_thread():
    """The checks' inputs are too small to share among CPU threads, whose start-up and waiting cost
    more than the work (several times over on a busy machine); the CPU kernels give bitwise the same
    results on any number of threads (tests/test_extension.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _without_tf32():
    """PyTorch's float32 convolutions and products in full float32, as the float64 reference computes
    them: TF32 (cuDNN's default on recent GPUs) would hide the fused kernels' errors in its own."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _where(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device} ({dtype_name(dtype)})"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# Records


def record_path(backend: str, device: torch.device, dtype: torch.dtype) -> Path:
    digest = hashlib.sha256(json.dumps(record_key(backend, device, dtype), sort_keys=True).encode()).hexdigest()
    return cache_dir() / "self-check" / f"{backend}-{device.type}-{dtype_name(dtype)}-{digest[:16]}.json"


def record_key(backend: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Everything that could change what ``backend`` computes on ``device``: the device itself (on
    a GPU the card, so that each rank checks its own), the software that compiles and runs the
    kernels, mamlfast's code and the checks that ran."""
    key = dict(backend=backend, dtype=dtype_name(dtype), device=describe_device(device), torch=torch.__version__,
               mamlfast=mamlfast_code(), checks=["ops", *sorted(_checks)])
    if backend == "triton":
        key["triton"] = triton_version()
        key["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    if backend in ("cpp", "cuda"):
        key["extension"] = extension_build()
    if device.type == "cuda":
        key["cuda"] = torch.version.cuda or torch.version.hip
        key["driver"] = driver_version()
    return key


def _read_record(path: Path, identity: dict) -> dict | None:
    """The record at ``path`` if it is one of agreement under ``identity``; None otherwise
    (absent, unreadable, half-written by a killed process of an older version, another key)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != identity or record.get("agrees") is not True:
        return None
    return record


def _write_record(path: Path, identity: dict, found: Verdict) -> None:
    try:
        write_json(path, dict(key=identity, agrees=True, checked_at=found.checked_at, seconds=found.seconds,
                              comparisons=[c.to_dict() for c in found.comparisons]))
    except (OSError, ValueError) as error:  # a read-only or full cache folder: checked again next time
        log.warning("could not record the self-check of backend %r in %s (%s): it runs again in the next process",
                    found.backend, path, first_line(error))


# The parts of the key


@functools.cache
def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return dict(type="cuda", name=properties.name, capability=f"{properties.major}.{properties.minor}",
                    uuid=str(getattr(properties, "uuid", "")))
    return dict(type=device.type, processor=processor_name(), machine=platform.machine(),
                capability=torch.backends.cpu.get_cpu_capability())


@functools.cache
def mamlfast_code() -> dict:
    """mamlfast's version and a digest of its Python sources (an editable install changes them in place)."""
    from .. import __version__
    package = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    return dict(version=__version__, sources=digest.hexdigest()[:16])


@functools.cache
def extension_build() -> dict | None:
    """The compiled extension's file: its name, size and modification time, which every build
    changes (even of the same sources with another compiler or toolkit), found without reading its
    megabytes."""
    try:
        from .. import _C
    except ImportError:
        return None
    compiled = Path(_C.__file__).stat()
    return dict(file=Path(_C.__file__).name, bytes=compiled.st_size, modified_ns=compiled.st_mtime_ns)


@functools.cache
def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@functools.cache
def driver_version() -> str:
    """The GPU driver's version: NVML's string (as nvidia-smi shows it), else the CUDA version the
    driver supports, else "unknown"."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlInit_v2() == 0:
            found = nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(96)) == 0
            nvml.nvmlShutdown()
            if found:
                return buffer.value.decode()
    except (OSError, AttributeError):
        pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"CUDA {version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "unknown"
