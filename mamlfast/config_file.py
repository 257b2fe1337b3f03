"""Config files of ``mamlfast train --config``: a run's own ``config.json``, or a reference experiment config.

A mamlfast config file is a JSON object of ``mamlfast train`` options by name: every
``MAMLConfig`` field, and ``preset``, ``variant``, ``dataset``, ``data_root``, ``keep``,
``log_every``, ``checkpoint_every`` and the data options ``class_split``, ``split_seed``, ``split_fractions``,
``pixels``, ``split_file``, ``image_mean`` and ``image_std``. Each run writes its complete
``config.json`` to its output folder, so that ``mamlfast train --config runs/x/config.json
--out runs/y`` repeats it. A file of the reference
implementation's keys is translated by ``mamlfast.reference_config``; the two kinds are told
apart by their keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import reference_config
from .config import MAMLConfig
from .files import shown, write_json

# option -> its JSON type; the MAMLConfig fields are typed by the dataclass
RUN_OPTIONS = {
    "preset": "str", "variant": "str", "dataset": "str", "data_root": "str | None", "keep": "int",
    "log_every": "int", "checkpoint_every": "int", "class_split": "str", "split_seed": "int",
    "split_fractions": "list", "pixels": "str", "split_file": "str", "image_mean": "list", "image_std": "list",
}
OPTIONS = {**RUN_OPTIONS, **{f.name: f.type for f in dataclasses.fields(MAMLConfig)}}


@dataclass
class ConfigFile:
    """What a config file asks for: ``mamlfast train`` options by name, and lines to show the user."""

    options: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    reference: bool = False


def read(path: str | Path, reference_quirks: bool = False) -> ConfigFile:
    """The options of a mamlfast or reference config file; ``ValueError`` in one line naming the file."""
    entries = _load(Path(path))
    try:
        if _is_reference(entries):
            translation = reference_config.translate(entries, quirks=reference_quirks)
            return ConfigFile(translation.options, translation.notes, reference=True)
        if reference_quirks:
            raise ValueError("--reference-quirks applies to the reference code's experiment configs, and this is "
                             "a mamlfast config")
        return ConfigFile(_checked(entries))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def run_options(cfg: MAMLConfig, dataset: str, data_root: str | Path | None, data_options: dict,
                **settings: int) -> dict[str, Any]:
    """The complete options of a run, as its ``config.json`` holds them; ``settings``: keep, log_every
    and checkpoint_every."""
    root = str(Path(data_root).resolve()) if data_root is not None else None
    return dict(dataset=dataset, data_root=root, **data_options, **settings, **cfg.to_dict())


def write(path: str | Path, options: dict[str, Any]) -> None:
    write_json(path, options)


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"config file {path} must hold a JSON object of options, not {type(entries).__name__}")
    return entries


def _is_reference(entries: dict[str, Any]) -> bool:
    ours = sorted(set(entries) & set(OPTIONS) - reference_config.KEYS)
    theirs = sorted(set(entries) & reference_config.KEYS - set(OPTIONS))
    if ours and theirs:
        raise ValueError(f"mixes mamlfast options ({shown(', '.join(ours))}) with keys of the reference code's "
                         f"experiment configs ({', '.join(theirs)})")
    return bool(theirs)


def _checked(entries: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(entries) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {shown(', '.join(unknown))}: a mamlfast config holds `mamlfast train` "
                         f"options "
                         f"by name (n_way, dataset, data_root, ...)")
    for name, value in entries.items():
        expected = OPTIONS[name]
        if not _has_type(value, expected):
            raise ValueError(f"{name}={shown(json.dumps(value))}: must be {_TYPE_NAMES[expected]}")
    return dict(entries)


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "str | None": "a string or null", "float | None": "a number or null", "bool | str": "true, false or a string",
               "list": "a list of numbers"}


def _has_type(value: Any, expected: str) -> bool:
    kinds = expected.split(" | ")
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int) and "int" in kinds:
        return True
    if isinstance(value, (int, float)):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    if isinstance(value, list):
        return "list" in kinds and all(_has_type(v, "float") for v in value)
    return False
