"""Omniglot on first use: the two published zips, fetched once and checked against their MD5 sums.

The files are the original distribution's (the ones torchvision and learn2learn fetch). For a
mirror, or for tests, ``MAMLFAST_OMNIGLOT_URL`` replaces the folder URL they are fetched from
and ``MAMLFAST_OMNIGLOT_MD5=<background>,<evaluation>`` the sums they must have.

A server cannot hold a download for ever: each read waits at most ``TIMEOUT_SECONDS``, each file
must arrive whole within ``DEADLINE_SECONDS`` however slowly the server sends it, headers
included, and a file larger than ``MAX_BYTES`` is refused. While it downloads, a process holds the
data root's lock, so that two downloads into one folder take turns and the temporary files that
killed downloads left can be removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import urllib.request
from functools import partial
from http.client import HTTPException
from pathlib import Path

from ..files import atomic_open, cache_dir, folder_lock, remove_temporaries
from ..progress import bar as progress_bar
from .images import DatasetError
from .omniglot import PARTS

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
OMNIGLOT_MD5 = ("68d2efa1b9178cc56df9314c21c6e718", "6b91aef0f799c5bb55b94e3f2daec811")  # background, evaluation
CHUNK = 1 << 20
TIMEOUT_SECONDS = 60
DEADLINE_SECONDS = 15 * 60  # 9.5 MB, the larger zip, at 11 kB/s
MAX_BYTES = 256 * 2**20     # the zips have 9.5 and 6.5 MB


def default_omniglot_root() -> Path:
    """Where Omniglot lives unless ``--data-root`` says otherwise: ``~/.cache/mamlfast/omniglot``."""
    return cache_dir() / "omniglot"


def download_omniglot(root: str | Path, progress: bool = False) -> None:
    """Make ``root`` hold both Omniglot zips with their expected sums, fetching those missing or damaged.

    A part already present as an extracted folder is left alone.
    """
    root = Path(root)
    base = os.environ.get("MAMLFAST_OMNIGLOT_URL", OMNIGLOT_URL).rstrip("/")
    wanted = dict(zip(PARTS, _expected_md5()))
    if not _missing(root, wanted):
        return
    with folder_lock(root, wait=True):
        for part in PARTS:
            remove_temporaries(root, f"{part}.zip")
        for part in _missing(root, wanted):  # again: another process may have fetched them meanwhile
            _fetch(f"{base}/{part}.zip", root / f"{part}.zip", wanted[part], root, progress)


def _missing(root: Path, wanted: dict[str, str]) -> list[str]:
    """The parts, of those ``wanted`` (part -> MD5), that ``root`` holds neither as a folder nor as a zip
    with the right sum."""
    return [part for part, expected in wanted.items() if not (
        (root / part).is_dir() or ((root / f"{part}.zip").is_file() and file_md5(root / f"{part}.zip") == expected))]


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_md5() -> tuple[str, ...]:
    override = os.environ.get("MAMLFAST_OMNIGLOT_MD5")
    if override is None:
        return OMNIGLOT_MD5
    sums = tuple(s.strip().lower() for s in override.split(","))
    if len(sums) != len(PARTS) or not all(re.fullmatch(r"[0-9a-f]{32}", s) for s in sums):
        raise DatasetError(f"MAMLFAST_OMNIGLOT_MD5={override!r}: expected two MD5 sums, <background>,<evaluation>")
    return sums


def _fetch(url: str, target: Path, expected: str, root: Path, progress: bool) -> None:
    """Download ``url`` to ``target`` atomically; a short, slow or corrupt download leaves ``target`` as it was."""
    by_hand = f"put {' and '.join(p + '.zip' for p in PARTS)} from {OMNIGLOT_URL} into {root} by hand"
    with _Deadline(DEADLINE_SECONDS) as deadline:
        def failed(error: BaseException, received: int = 0) -> DatasetError:
            if deadline.expired:
                return DatasetError(f"the download of {url} did not finish within {DEADLINE_SECONDS} seconds "
                                    f"({received} bytes received); nothing was kept: run again to retry, or {by_hand}")
            reason = getattr(error, "reason", None) or error
            return DatasetError(f"could not download {url} ({reason}); without network access, {by_hand}")

        try:
            response = deadline.opener().open(url, timeout=TIMEOUT_SECONDS)
        except (HTTPException, OSError) as error:  # URLError, timeouts, refused connections, TLS
            raise failed(error) from None
        with response, atomic_open(target, "wb") as handle:
            length = response.length  # Content-Length; None where absent or malformed: then the MD5 decides
            if length is not None and length > MAX_BYTES:
                raise DatasetError(f"the server of {url} announces {length} bytes, more than the {MAX_BYTES} that "
                                   f"an Omniglot zip could have")
            digest, received = hashlib.md5(), 0
            with progress_bar(total=length, desc=f"downloading {target.name}", unit="B", unit_scale=True,
                              leave=False, disable=not progress) as bar:
                while True:
                    try:
                        chunk = response.read1(CHUNK)
                    except (HTTPException, OSError) as error:
                        raise failed(error, received) from None
                    if deadline.expired:  # its connection was shut down: the read ended early
                        raise failed(TimeoutError(), received)
                    if not chunk:
                        break
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if received > MAX_BYTES:
                        raise DatasetError(f"the server of {url} sent more than {MAX_BYTES} bytes, more than an "
                                           f"Omniglot zip could have; nothing was kept")
            if length is not None and received != length:
                raise DatasetError(f"the download of {url} stopped after {received} of {length} bytes; nothing "
                                   f"was kept, run again to retry")
            if digest.hexdigest() != expected:
                raise DatasetError(f"the download of {url} is corrupt (MD5 {digest.hexdigest()}, expected "
                                   f"{expected}); nothing was kept, run again to retry")


class _Deadline:
    """Ends a download that takes longer than ``seconds`` in all: when they are up, the connections
    of ``opener()`` are shut down, which ends any read or wait for headers under way."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._guard = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener (proxies and redirects as usual) whose HTTP(S) connections this deadline ends."""
        handlers = [_WatchedHTTP(), _WatchedHTTPS()]
        for handler in handlers:
            handler.deadline = self
        return urllib.request.build_opener(*handlers)

    def connection(self, http_class, *args, **kwargs):
        """An ``http_class`` connection whose socket this deadline watches once connected."""
        connection = http_class(*args, **kwargs)
        connect = connection.connect

        def watched_connect():
            connect()
            self._watch(connection.sock)
        connection.connect = watched_connect
        return connection

    def _watch(self, sock: socket.socket) -> None:
        with self._guard:
            self._sockets.append(sock)
            if self.expired:
                _shut_down(sock)

    def _expire(self) -> None:
        with self._guard:
            self.expired = True
            for sock in self._sockets:
                _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    """End the reads of ``sock`` in any thread. The plain socket's own shutdown, also for a TLS socket:
    its reader sees the connection end, and the TLS state stays for that reader to fail on."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


class _WatchedConnections:
    """A urllib handler whose connections a ``_Deadline`` watches."""

    deadline: _Deadline

    def do_open(self, http_class, request, **kwargs):
        return super().do_open(partial(self.deadline.connection, http_class), request, **kwargs)


class _WatchedHTTP(_WatchedConnections, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_WatchedConnections, urllib.request.HTTPSHandler):
    pass
