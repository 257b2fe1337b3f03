"""Class-labelled images held as one uint8 tensor, decoded once from folders or zips, and cached."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..files import atomic_open

CACHE_VERSION = 1


class DatasetError(ValueError):
    """A data set is missing, malformed, corrupt or too small for the tasks asked of it."""


@dataclass
class ClassImages:
    """The images of some classes, class after class: ``images`` [num_images, C, H, W] uint8.

    Class c owns rows ``offsets[c] : offsets[c] + counts[c]``.
    """

    images: torch.Tensor
    counts: torch.Tensor
    names: list[str]

    @property
    def offsets(self) -> torch.Tensor:
        return torch.cumsum(self.counts, 0) - self.counts

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def select(self, classes: Iterable[int]) -> "ClassImages":
        """The classes ``classes``, in that order."""
        classes = list(classes)
        offsets, counts = self.offsets.tolist(), self.counts.tolist()
        rows = [torch.arange(offsets[c], offsets[c] + counts[c]) for c in classes]
        return ClassImages(self.images[torch.cat(rows)] if rows else self.images[:0],
                           self.counts[classes], [self.names[c] for c in classes])


@dataclass(frozen=True, order=True)
class ImageSource:
    """One image file: a path on disk, or a member of a zip archive."""

    path: str
    member: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


def decode(source: ImageSource, archive: zipfile.ZipFile | None, size: int, mode: str,
           resize_first: bool = False) -> np.ndarray:
    """The image at ``source`` as uint8 [C, size, size] in PIL ``mode`` ("L" or "RGB").

    The image is converted to ``mode`` and then resized, so that a 1-bit image is smoothed;
    with ``resize_first`` it is resized in its own mode, which Pillow does nearest-neighbour for
    1-bit images, so that they stay binary.
    """
    try:
        data = archive.read(source.member) if archive is not None else Path(source.path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if not resize_first:
                image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.LANCZOS)
            if image.mode != mode:
                image = image.convert(mode)
            array = np.asarray(image, dtype=np.uint8)
    except zipfile.BadZipFile as error:
        raise DatasetError(f"corrupt zip file {source.path}: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"corrupt image {source}: {error}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_classes(classes: list[tuple[str, list[ImageSource]]], size: int, mode: str,
                   progress: Callable[[Iterable], Iterable] = iter, resize_first: bool = False) -> ClassImages:
    """Decode every image of every class (name, sources) into one ClassImages (see ``decode``)."""
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        arrays = []
        for _, sources in progress(classes):
            for source in sources:
                archive = None
                if source.member is not None:
                    if source.path not in archives:
                        archives[source.path] = open_zip(source.path)
                    archive = archives[source.path]
                arrays.append(decode(source, archive, size, mode, resize_first))
    finally:
        for archive in archives.values():
            archive.close()
    counts = torch.tensor([len(sources) for _, sources in classes], dtype=torch.int64)
    return ClassImages(torch.from_numpy(np.stack(arrays)), counts, [name for name, _ in classes])


def open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"corrupt zip file {path}: {error}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("MAMLFAST_CACHE", Path.home() / ".cache" / "mamlfast"))


def cached(name: str, fingerprint: dict, build: Callable[[], ClassImages]) -> ClassImages:
    """``build()``, or its result saved earlier for the same ``fingerprint`` of the sources."""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            return ClassImages(saved["images"], saved["counts"], saved["names"])
        except Exception:  # an unreadable cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
    result = build()
    try:
        with atomic_open(path, "wb") as handle:
            torch.save({"images": result.images, "counts": result.counts, "names": result.names}, handle)
    except OSError:
        pass  # a read-only or full cache directory only costs the decoding next time
    return result


def fingerprint(paths: Iterable[Path]) -> list:
    """What identifies the contents of source files cheaply: path, size, modification time."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
