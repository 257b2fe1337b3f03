"""Checkpoints: written atomically with a checksum of their contents, read with ``weights_only=True``
and verified, checked against the run."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from .config import MAMLConfig
from .files import atomic_open, first_line
from .learner import MAMLPlusPlus

FORMAT = 2  # 2: with the SHA-256 of the contents
# Fields that change how a run executes, not what it computes: a run may resume with others.
EXECUTION_FIELDS = ("backend", "cuda_graphs", "recompute")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt, or does not belong to the run that reads it."""


def save(path: str | os.PathLike, payload: dict) -> None:
    payload = dict(payload, format=FORMAT)
    payload["sha256"] = checksum(payload)
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def load(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, its tensors on the CPU, after checking that it is one and intact."""
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
