"""Files that a crash never leaves half-written, strict JSON, and owning a run's folder.

Every file is written to a temporary file beside it and renamed over it in one step, with the
permissions a plain ``open`` would give (the user's umask). A write that fails (a full disk, no
permission) raises ``WriteError``, one line naming the file, and leaves the file as it was. A
run locks its folder while it writes there; the operating system drops the lock when the
process ends, however it ends.
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


def cache_dir() -> Path:
    """mamlfast's cache folder: decoded data sets, self-check records (``MAMLFAST_CACHE``, else ~/.cache/mamlfast)."""
    return Path(os.environ.get("MAMLFAST_CACHE", Path.home() / ".cache" / "mamlfast"))


class FolderInUse(OSError):
    """Another process holds the lock of a folder."""


class WriteError(OSError):
    """A file could not be written: a full disk, a read-only file system, no permission."""

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror[:1].lower()}{self.strerror[1:]}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an operating system error in the block into ``WriteError`` naming ``path``. Libraries
    that write through a file object (torch.save) wrap that error in their own: it is found in
    the exception's context. Code in the block that reads elsewhere (a download) turns its own
    errors into others first."""
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        cause = _os_error(error)
        if cause is None:
            raise
        raise WriteError(cause.errno, cause.strerror or first_line(cause), os.fspath(path)) from error


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError that ``error`` is, or that caused it, as its traceback would show it."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return error


def _create(path: str, flags: int) -> int:
    """A descriptor of ``path``, opened for writing with ``flags``; mode 0o666 as open() uses, so that
    the umask decides who may read it (tempfile would make it 0o600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o666)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename."""
    path = os.fspath(path)
    with writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        while True:
            temporary = f"{path}.{secrets.token_hex(4)}.tmp"
            try:
                descriptor = _create(temporary, os.O_EXCL)
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


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to the text file ``path``. A kill or a full disk can tear
    the line: readers drop a torn last line."""
    with writing(path), os.fdopen(_create(os.fspath(path), os.O_APPEND), "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


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


def shown(text: str, limit: int = 100) -> str:
    """``text`` (a value as a message quotes it) cut to ``limit`` characters, saying how long it was,
    so that a message stays one readable line whatever value it names."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def json_text(payload: object, **options) -> str:
    """``payload`` as strict JSON: a non-finite float (NaN, Infinity) is an error, not written."""
    return json.dumps(payload, allow_nan=False, **options)


def write_json(path: str | os.PathLike, payload: object) -> None:
    text = json_text(payload, indent=2)
    with atomic_open(path) as handle:
        handle.write(text + "\n")


@contextmanager
def folder_lock(folder: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold the lock of ``folder`` (created if need be) while the block runs, so that no other
    process that asks for it writes there meanwhile; with ``wait``, wait for a process that holds
    it, else raise ``FolderInUse``. Nested blocks in one process share it.

    The lock is ``flock`` on ``folder/.lock``, which the operating system drops when the process
    ends, however it ends: a killed run never keeps its folder. Where the file system has no
    locks (some cluster file systems), a warning says so and the block runs unprotected.
    """
    real = os.path.realpath(folder)
    if real in _held_locks:
        _held_locks[real] += 1
        try:
            yield
        finally:
            _held_locks[real] -= 1
        return
    if os.path.exists(real) and not os.path.isdir(real):
        raise NotADirectoryError(f"{real} is a file, not a folder")
    lock_path = os.path.join(real, LOCK_NAME)
    with writing(lock_path):
        # the path as given, as later writes resolve it: "runs/../x" needs runs/ to exist
        os.makedirs(folder, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _lock(descriptor, real, wait)
        _held_locks[real] = 1
        try:
            yield
        finally:
            del _held_locks[real]
    finally:
        os.close(descriptor)  # releases the lock


@contextmanager
def waiting_lock(path: str | os.PathLike, waiting: Callable[[str], None] = lambda holder: None) -> Iterator[None]:
    """Hold the lock file ``path`` (created if need be) while the block runs, first waiting for
    any other process that holds it; ``waiting`` is told who holds it before the wait begins.

    As for ``folder_lock``, the operating system drops the lock when its process ends, however it
    ends; where the file system has no locks, a warning says so and the block runs unprotected.
    """
    with writing(path):
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
        with writing(path):
            _stamp(descriptor)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _lock(descriptor: int, folder: str, wait: bool) -> None:
    try:
        _flock(descriptor, blocking=wait)
    except BlockingIOError:
        raise FolderInUse(f"{folder} is in use by another run ({_holder(descriptor)}): wait for it to end, "
                          f"or use another folder") from None
    except OSError as error:
        _unprotected(folder, error)
        return
    with writing(os.path.join(folder, LOCK_NAME)):  # who holds it, for the message of another run
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
