"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the run."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import MAMLConfig
from .files import atomic_open
from .learner import MAMLPlusPlus

FORMAT = 1
# Fields that change how a run executes, not what it computes: a run may resume with others.
EXECUTION_FIELDS = ("backend", "cuda_graphs", "recompute")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not belong to the run that reads it."""


def save(path: str | os.PathLike, payload: dict) -> None:
    with atomic_open(path, "wb") as handle:
        torch.save(dict(payload, format=FORMAT), handle)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file; all mean the same here
        raise CheckpointError(f"checkpoint {path} could not be read: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise CheckpointError(f"{path} is not a mamlfast checkpoint (format {FORMAT})")
    return payload


def config_of(payload: dict) -> MAMLConfig:
    return MAMLConfig.from_dict(payload["config"])


def check_same_run(payload: dict, cfg: MAMLConfig, path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` naming every field in which ``cfg`` differs from the checkpoint's."""
    differences = {field: values for field, values in config_of(payload).differences(cfg).items()
                   if field not in EXECUTION_FIELDS}
    if differences:
        listed = ", ".join(f"{field} (checkpoint {old!r}, now {new!r})" for field, (old, new) in differences.items())
        raise CheckpointError(f"checkpoint {path} belongs to a run with a different config: {listed}")


def learner_from(payload: dict, device: str | torch.device = "cpu", **execution) -> MAMLPlusPlus:
    """The learner saved in ``payload``, with ``execution`` fields (backend, cuda_graphs) replaced."""
    cfg = config_of(payload)
    if execution:
        cfg = cfg.replace(**execution)
    learner = MAMLPlusPlus(cfg).to(device)
    learner.load_state_dict(payload["model"])
    return learner.eval()
