"""Checkpoints: written atomically with a checksum of their contents, read with ``weights_only=True``,
verified, their structure checked, and checked against the run."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import threading
from pathlib import Path

import torch

from .config import MAMLConfig
from .files import atomic_open, first_line, shown
from .learner import MAMLPlusPlus
from .schedules import total_iterations
from .step import make_optimizer

FORMAT = 2  # 2: with the SHA-256 of the contents
# What a checkpoint holds, besides its format and checksum
PARTS = ("config", "run", "model", "optimizer", "scheduler", "iteration", "epoch", "elapsed", "history", "rng")
# Fields that change how a run executes, not what it computes: a run may resume with others.
EXECUTION_FIELDS = ("backend", "cuda_graphs", "recompute")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt, or does not belong to the run that reads it."""


def save(path: str | os.PathLike, payload: dict) -> None:
    payload = dict(payload, format=FORMAT)
    payload["sha256"] = checksum(payload)
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


class BackgroundWriter:
    """Writes checkpoints one at a time on a thread, each from a copy on the host of the payload
    taken when it is handed over, so that training goes on while it is written. A write's error
    is raised by the next call, or on leaving the writer's block; leaving the block waits for the
    write in flight."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, path: str | os.PathLike, payload: dict) -> None:
        """Start writing ``payload`` to ``path``, after the write in flight."""
        self.wait()
        copy = _host_copy(payload)
        self._thread = threading.Thread(target=self._write, args=(path, copy), name="checkpoint writer",
                                        daemon=True)
        self._thread.start()

    def _write(self, path, payload: dict) -> None:
        try:
            save(path, payload)
        except BaseException as error:  # raised in the training thread, by the next call
            self._error = error

    def wait(self) -> None:
        """Wait for the write in flight; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.wait()
        elif self._thread is not None:  # another error is on its way: it is the one to report
            self._thread.join()
            self._thread, self._error = None, None


def _host_copy(value):
    """``value`` with every tensor copied to the host, and every dict and list copied: what training
    changes later leaves the copy as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(item) for item in value)
    return value


def load(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, its tensors on the CPU, after checking that it is one, intact, and
    holds every part of a run in the form this version writes them."""
    payload = read(path)
    problem = _structure_problem(payload)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not a mamlfast checkpoint of this version: {problem}")
    return payload


def read(path: str | os.PathLike) -> dict:
    """The contents of the checkpoint file ``path``, its tensors on the CPU, after checking that it is
    one and intact, but not what it holds (see ``load``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a foreign or damaged file; all mean the same here
        raise CheckpointError(_unreadable(path, error)) from None
    if not isinstance(payload, dict) or "format" not in payload or "model" not in payload:
        raise CheckpointError(f"{path} is not a mamlfast checkpoint")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {payload['format']!r}; this version of mamlfast "
                              f"reads format {FORMAT}")
    if payload.get("sha256") != checksum(payload):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the checksum stored in it")
    return payload


def _structure_problem(payload: dict) -> str | None:
    """What in ``payload`` is not as ``Trainer._save`` writes it, or None."""
    missing = [part for part in PARTS if part not in payload]
    if missing:
        return f"it has no {', '.join(missing)}"
    if not isinstance(payload["config"], dict):
        return f"its config is {_kind(payload['config'])}, not a mapping of MAMLConfig fields"
    try:
        cfg = MAMLConfig.from_dict(payload["config"])
    except (ValueError, TypeError) as error:
        return f"its config: {error}"
    iteration, epochs_done = payload["iteration"], None
    problem = _run_problem(payload["run"]) or _integer_problem("iteration", iteration, 0, total_iterations(cfg))
    if problem is None:
        epochs_done = iteration // cfg.iters_per_epoch
        if not (_is_integer(payload["epoch"]) and payload["epoch"] == epochs_done):
            problem = f"its epoch is {_kind(payload['epoch'])}, not {epochs_done}, the epochs of its iteration"
        elif not (_is_number(payload["elapsed"]) and 0 <= payload["elapsed"] < math.inf):
            problem = f"its elapsed is {_kind(payload['elapsed'])}, not a number of seconds"
    return (problem or _history_problem(payload["history"], epochs_done) or _state_problem(payload, cfg)
            or _rng_problem(payload["rng"]))


def _run_problem(run) -> str | None:
    if not isinstance(run, dict):
        return f"its run is {_kind(run)}, not a mapping"
    kinds = dict(dataset=(str,), data_root=(str, type(None)), data_options=(dict,))
    for key, types in kinds.items():
        if (key in run or key != "data_options") and not isinstance(run.get(key), types):  # absent in early runs
            return f"its run's {key} is {_kind(run.get(key))}"
    # absent before runs recorded them
    return _integer_problem("run's keep", run.get("keep", 0), 0) or \
        _integer_problem("run's log_every", run.get("log_every", 1), 1) or \
        _integer_problem("run's checkpoint_every", run.get("checkpoint_every", 0), 0)


def _history_problem(history, epochs: int) -> str | None:
    """A problem of the validation history: one entry per epoch done, each as ``Trainer._end_epoch`` makes it."""
    if not isinstance(history, list) or len(history) != epochs:
        return f"its history is {_kind(history)}, not a list of the {epochs} epochs done"
    for epoch, entry in enumerate(history):
        if not isinstance(entry, dict) or not _is_integer(entry.get("epoch")) or entry["epoch"] != epoch \
                or not _is_integer(entry.get("iteration")) or not isinstance(entry.get("kept"), bool) \
                or not (_is_number(entry.get("val_accuracy")) and 0 <= entry["val_accuracy"] <= 1):
            return (f"its history's entry {epoch} is {_kind(entry)}, not {{'epoch': {epoch}, 'iteration': <integer>, "
                    f"'val_accuracy': <number in [0, 1]>, 'kept': <true or false>}}")
    return None


def _state_problem(payload: dict, cfg: MAMLConfig) -> str | None:
    """A problem of the model, optimizer and scheduler states, for a learner of ``cfg``."""
    model = payload["model"]
    if not isinstance(model, dict):
        return f"its model is {_kind(model)}, not a mapping of tensors"
    learner = MAMLPlusPlus(cfg.replace(backend="torch", recompute=False))  # how it runs changes no shape
    expected = learner.state_dict()
    wrong = sorted(map(str, set(expected) ^ set(model)))
    if wrong:
        return f"its model's tensors are not those of its config: {shown(', '.join(wrong))}"
    for name, tensor in expected.items():
        if not (isinstance(model[name], torch.Tensor) and model[name].is_floating_point()
                and model[name].shape == tensor.shape):
            return f"its model's {name} is {_kind(model[name])}, not a floating-point tensor of shape " \
                   f"{list(tensor.shape)}"
    optimizer = make_optimizer(learner, cfg, torch.device("cpu"))
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except Exception as error:  # torch raises many types for a malformed state; all mean the same here
        return f"its optimizer state does not fit its model ({first_line(error)})"
    for parameter in learner.parameters():
        state = optimizer.state.get(parameter)
        if state is not None:  # a parameter without a step yet has none
            moments = (state.get("exp_avg"), state.get("exp_avg_sq"))
            if "step" not in state or not all(isinstance(m, torch.Tensor) and m.shape == parameter.shape
                                              for m in moments):
                return "its optimizer state holds moments that do not fit its model's parameters"
    scheduler = payload["scheduler"]
    if not (isinstance(scheduler, dict) and scheduler.get("last_epoch") == payload["iteration"]
            and scheduler.get("T_max") == total_iterations(cfg) and scheduler.get("eta_min") == cfg.min_meta_lr
            and all(isinstance(scheduler.get(key), list) and len(scheduler[key]) == 1 and _is_rate(scheduler[key][0])
                    for key in ("base_lrs", "_last_lr"))):
        return f"its scheduler state is not the cosine schedule of its config at iteration {payload['iteration']}"
    return None


def _rng_problem(rng) -> str | None:
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        return "its rng is not a mapping holding torch's state"
    try:
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate((3, tuple(rng["python"]), None))
    except Exception as error:  # the generators raise many types for a malformed state; all mean the same here
        return f"its rng holds a state that the generators refuse ({first_line(error)})"
    cuda = rng.get("cuda", [])
    if not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
        return "its rng's cuda states are not a list of byte tensors"
    return None


def _integer_problem(name: str, value, low: int, high: float = math.inf) -> str | None:
    if not (_is_integer(value) and low <= value <= high):
        return f"its {name} is {_kind(value)}, not an integer from {low}" + (f" to {high}" if high < math.inf else "")
    return None


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rate(value) -> bool:
    """A learning rate: a number, or a one-element tensor where Adam keeps it on a GPU (capturable)."""
    return _is_number(value) or isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()


def _kind(value) -> str:
    """``value`` as a message names it: a tensor by its shape, a short value by its repr, another by its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__} of {len(text)} characters"


def checksum(payload: dict) -> str:
    """SHA-256 of everything in ``payload`` but its ``sha256`` entry: tensors by dtype, shape and
    bytes, other values by type and ``repr``."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in payload.items() if key != "sha256"})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):  # one kind: a tuple may come back from a file as a list
        digest.update(f"sequence {len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__} {value!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__} in a checkpoint")


def _unreadable(path: Path, error: Exception) -> str:
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return (f"{path} is not a mamlfast checkpoint: it holds Python objects other than tensors and plain "
                f"values, which mamlfast never loads")
    return f"{path} is not a mamlfast checkpoint, or is damaged ({first_line(error)})"


def config_of(payload: dict) -> MAMLConfig:
    return MAMLConfig.from_dict(payload["config"])


def differences(payload: dict, cfg: MAMLConfig) -> dict:
    """Fields that change what is computed in which ``cfg`` differs from the checkpoint's:
    name -> (checkpoint's value, ``cfg``'s value)."""
    return {field: values for field, values in config_of(payload).differences(cfg).items()
            if field not in EXECUTION_FIELDS}


def check_same_run(payload: dict, cfg: MAMLConfig, path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` naming every field in which ``cfg`` differs from the checkpoint's."""
    found = differences(payload, cfg)
    if found:
        listed = ", ".join(f"{field} (checkpoint {old!r}, now {new!r})" for field, (old, new) in found.items())
        raise CheckpointError(f"checkpoint {path} belongs to a run with a different config: {listed}")


def learner_from(payload: dict, device: str | torch.device = "cpu", **execution) -> MAMLPlusPlus:
    """The learner saved in ``payload``, with ``execution`` fields (backend, cuda_graphs) replaced."""
    cfg = config_of(payload)
    if execution:
        cfg = cfg.replace(**execution)
    learner = MAMLPlusPlus(cfg).to(device)
    learner.load_state_dict(payload["model"])
    return learner.eval()
