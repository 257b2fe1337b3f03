"""Omniglot on first use: the two published zips, fetched once and checked against their MD5 sums.

The files are the original distribution's (the ones torchvision and learn2learn fetch). For a
mirror, or for tests, ``MAMLFAST_OMNIGLOT_URL`` replaces the folder URL they are fetched from
and ``MAMLFAST_OMNIGLOT_MD5=<background>,<evaluation>`` the sums they must have.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

from ..files import atomic_open
from .cache import cache_dir
from .images import DatasetError
from .omniglot import PARTS

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
OMNIGLOT_MD5 = ("68d2efa1b9178cc56df9314c21c6e718", "6b91aef0f799c5bb55b94e3f2daec811")  # background, evaluation
CHUNK = 1 << 20
TIMEOUT_SECONDS = 60


def default_omniglot_root() -> Path:
    """Where Omniglot lives unless ``--data-root`` says otherwise: ``~/.cache/mamlfast/omniglot``."""
    return cache_dir() / "omniglot"


def download_omniglot(root: str | Path, progress: bool = False) -> None:
    """Make ``root`` hold both Omniglot zips with their expected sums, fetching those missing or damaged.

    A part already present as an extracted folder is left alone.
    """
    root = Path(root)
    base = os.environ.get("MAMLFAST_OMNIGLOT_URL", OMNIGLOT_URL).rstrip("/")
    for part, expected in zip(PARTS, _expected_md5()):
        target = root / f"{part}.zip"
        if (root / part).is_dir() or (target.is_file() and file_md5(target) == expected):
            continue
        _fetch(f"{base}/{part}.zip", target, expected, root, progress)


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
    """Download ``url`` to ``target`` atomically; a short or corrupt download leaves ``target`` as it was."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, atomic_open(target, "wb") as handle:
            length = int(response.headers.get("Content-Length") or 0) or None
            received, digest = _copy(response, handle, length, f"downloading {target.name}", progress)
            if length is not None and received != length:
                raise DatasetError(f"the download of {url} stopped after {received} of {length} bytes; nothing "
                                   f"was kept, run again to retry")
            if digest != expected:
                raise DatasetError(f"the download of {url} is corrupt (MD5 {digest}, expected {expected}); "
                                   f"nothing was kept, run again to retry")
    except (urllib.error.URLError, HTTPException, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", None) or error
        raise DatasetError(f"could not download {url} ({reason}); without network access, put "
                           f"{' and '.join(p + '.zip' for p in PARTS)} from {OMNIGLOT_URL} into {root} by hand"
                           ) from None
    except OSError as error:
        raise DatasetError(f"could not write {target}: {error}") from None


def _copy(response, handle, length: int | None, description: str, progress: bool) -> tuple[int, str]:
    """Copy ``response`` into ``handle``: (bytes copied, their MD5)."""
    digest, received = hashlib.md5(), 0
    with tqdm(total=length, desc=description, unit="B", unit_scale=True, leave=False, disable=not progress) as bar:
        for chunk in iter(lambda: response.read(CHUNK), b""):
            handle.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received, digest.hexdigest()
