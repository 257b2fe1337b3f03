"""Writing files so that a crash never leaves one half-written: a temporary file, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(mode, dir=directory, prefix=os.path.basename(path) + ".",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def write_json(path: str | os.PathLike, payload: object) -> None:
    with atomic_open(path) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
