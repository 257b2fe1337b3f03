"""Files that a crash never leaves half-written, strict JSON, and owning a run's folder.

Every file is written to a temporary file beside it and renamed over it in one step, with the
permissions a plain ``open`` would give (the user's umask). A run locks its folder while it
writes there; the operating system drops the lock when the process ends, however it ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# atomic_open's temporary files: <target>.<8 hex digits>.tmp
_TEMPORARY = re.compile(r"\.[0-9a-f]{8}\.tmp$")
_held_locks: dict[str, int] = {}  # folder -> how many nested folder_lock blocks hold it in this process


class FolderInUse(OSError):
    """Another process holds the lock of a folder."""


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        temporary = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            # mode 0o666 as open() uses: the umask decides who may read it (tempfile would make it 0o600)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def remove_temporaries(folder: str | os.PathLike, target: str = "*", older_than: float = 0.0) -> list[Path]:
    """Remove the temporary files of ``target`` (a glob) in ``folder`` that killed writes left,
    those last modified more than ``older_than`` seconds ago; return them. A temporary file is
    stale only where no write can be under way: in a folder this process has locked, or when old."""
    now, removed = time.time(), []
    for path in Path(folder).glob(f"{target}.*.tmp"):
        try:
            if _TEMPORARY.search(path.name) and now - path.stat().st_mtime >= older_than:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer finished, or another process removed it
            pass
    return removed


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message (libraries' messages can run to many lines)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def json_text(payload: object, **options) -> str:
    """``payload`` as strict JSON: a non-finite float (NaN, Infinity) is an error, not written."""
    return json.dumps(payload, allow_nan=False, **options)


def write_json(path: str | os.PathLike, payload: object) -> None:
    text = json_text(payload, indent=2)
    with atomic_open(path) as handle:
        handle.write(text + "\n")


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``folder`` (created if need be) while the block runs, so that no other
    process that asks for it writes there meanwhile. Nested blocks in one process share it.

    The lock is ``flock`` on ``folder/.lock``, which the operating system drops when the process
    ends, however it ends: a killed run never keeps its folder. Where the file system has no
    locks (some cluster file systems), a warning says so and the block runs unprotected.
    """
    folder = os.path.realpath(folder)
    if folder in _held_locks:
        _held_locks[folder] += 1
        try:
            yield
        finally:
            _held_locks[folder] -= 1
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    os.makedirs(folder, exist_ok=True)
    descriptor = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _lock(descriptor, folder)
        _held_locks[folder] = 1
        try:
            yield
        finally:
            del _held_locks[folder]
    finally:
        os.close(descriptor)  # releases the lock


@contextmanager
def waiting_lock(path: str | os.PathLike, waiting: Callable[[str], None] = lambda holder: None) -> Iterator[None]:
    """Hold the lock file ``path`` (created if need be) while the block runs, first waiting for
    any other process that holds it; ``waiting`` is told who holds it before the wait begins.

    As for ``folder_lock``, the operating system drops the lock when its process ends, however it
    ends; where the file system has no locks, a warning says so and the block runs unprotected.
    """
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            _flock(descriptor, blocking=False)
        except BlockingIOError:
            waiting(_holder(descriptor))
            _flock(descriptor, blocking=True)
        except OSError as error:
            _unprotected(path, error)
            yield
            return
        _stamp(descriptor)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _lock(descriptor: int, folder: str) -> None:
    try:
        _flock(descriptor, blocking=False)
    except BlockingIOError:
        raise FolderInUse(f"{folder} is in use by another run ({_holder(descriptor)}): wait for it to end, "
                          f"or use another folder") from None
    except OSError as error:
        _unprotected(folder, error)
        return
    _stamp(descriptor)


def _flock(descriptor: int, blocking: bool) -> None:
    if fcntl is None:
        raise OSError("no fcntl module on this platform")
    fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))


def _unprotected(path: str | os.PathLike, error: OSError) -> None:
    log.warning("cannot lock %s (%s): nothing stops another process from writing there at the same time",
                path, error.strerror or error)


def _holder(descriptor: int) -> str:
    """Who holds a lock, as its holder wrote it into the lock file."""
    return os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "a process"


def _stamp(descriptor: int) -> None:
    """Write who holds the lock into the lock file, for whoever finds it held."""
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, "
                          f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
