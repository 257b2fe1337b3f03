"""Class-labelled images held as one uint8 tensor, decoded once from folders or zips, and cached."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from ..files import atomic_open, first_line, remove_temporaries

log = logging.getLogger(__name__)
CACHE_VERSION = 1
# PIL modes that convert to "L" and "RGB" as they should; 16-bit grayscale and alpha are handled apart
_PLAIN_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


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


def has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether the file name ``name`` ends in one of ``suffixes`` (lower case), in any case: IMG.PNG
    counts as img.png, in folders as in zips."""
    return name.lower().endswith(suffixes)


def image_paths(folder: Path, pattern: str, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """The paths in ``folder`` that match the glob ``pattern`` (without a suffix: "*/*/*") and end in
    one of ``suffixes``, in any case; unsorted."""
    return (path for path in folder.glob(pattern) if has_suffix(path.name, suffixes))


def decode(source: ImageSource, archive: zipfile.ZipFile | None, size: int, mode: str,
           resize_first: bool = False) -> np.ndarray:
    """The image at ``source`` as uint8 [C, size, size] in PIL ``mode`` ("L" or "RGB").

    The image is converted to ``mode`` and then resized, so that a 1-bit image is smoothed;
    with ``resize_first`` it is resized in its own mode, which Pillow does nearest-neighbour for
    1-bit images, so that they stay binary.
    """
    try:
        data = archive.read(source.member) if archive is not None else Path(source.path).read_bytes()
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DatasetError(f"corrupt zip file {source.path}: member {source.member}: {error}") from None
    except OSError as error:
        raise DatasetError(f"cannot read image {source}: {error.strerror or error}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = _eight_bit(image, source)
            if not resize_first:
                image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.LANCZOS)
            if image.mode != mode:
                image = image.convert(mode)
            array = np.asarray(image, dtype=np.uint8)
    except DatasetError:
        raise
    except Exception as error:  # decoders raise many types for a damaged file; all mean the same here
        raise DatasetError(f"corrupt image {source}: {first_line(error)}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _eight_bit(image: Image.Image, source: ImageSource) -> Image.Image:
    """``image`` in a mode whose conversion to "L" or "RGB" keeps its meaning: 16-bit grayscale
    scaled to 8 bits (PIL would clip it, making it almost white), an alpha channel dropped where
    every pixel is opaque. Anything else unusual is refused by name rather than guessed at."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES:
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            raise DatasetError(f"image {source} is transparent in places (mode {image.mode}), which has no one "
                               f"right reading as a training image: flatten it onto a background first")
        return image.convert("RGB" if image.mode.startswith("RGB") else "L")
    if image.mode not in _PLAIN_MODES:
        raise DatasetError(f"image {source} has PIL mode {image.mode}, which mamlfast does not decode (it reads "
                           f"8- and 16-bit grayscale, palette, RGB, CMYK and YCbCr images)")
    return image


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


def cached(name: str, fingerprint: dict, build: Callable[[], ClassImages],
           classes: list[tuple[str, list[ImageSource]]], image_shape: tuple[int, int, int]) -> ClassImages:
    """``build()``, or its result saved earlier for the same ``fingerprint`` of the sources.

    A saved result is used only if it matches the source's ``classes`` (names and image counts)
    and ``image_shape`` [C, H, W]; one that is unreadable or does not match is rebuilt, with a
    warning, and replaced where the cache folder is writable.
    """
    key = hashlib.sha256(json.dumps([CACHE_VERSION, fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            result = ClassImages(saved["images"], saved["counts"], saved["names"])
            problem = _mismatch(result, classes, image_shape)
        except Exception as error:  # torch raises many types for a damaged file; all mean the same here
            problem = f"unreadable ({first_line(error)})"
        if problem is None:
            return result
        log.warning("cache file %s is %s: decoding the images again", path, problem)
    result = build()
    try:
        with atomic_open(path, "wb") as handle:
            torch.save({"images": result.images, "counts": result.counts, "names": result.names}, handle)
        remove_temporaries(path.parent, path.name, older_than=3600.0)  # of killed writes, not of running ones
    except OSError as error:  # a read-only or full cache folder only costs the decoding next time
        log.warning("could not write the cache file %s (%s): the images will be decoded again next time",
                    path, error.strerror or error)
    return result


def _mismatch(saved: ClassImages, classes: list[tuple[str, list[ImageSource]]],
              image_shape: tuple[int, int, int]) -> str | None:
    """How a cached ClassImages disagrees with the source it stands for, or None."""
    if saved.names != [name for name, _ in classes]:
        return "for other classes than the source's"
    counts = torch.tensor([len(sources) for _, sources in classes], dtype=torch.int64)
    if not (isinstance(saved.counts, torch.Tensor) and torch.equal(saved.counts, counts)):
        return "for other image counts than the source's"
    images = saved.images
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or \
            tuple(images.shape) != (int(counts.sum()), *image_shape):
        return f"of the wrong shape or type, not uint8 [{int(counts.sum())}, {', '.join(map(str, image_shape))}]"
    return None


def fingerprint(paths: Iterable[Path]) -> list:
    """What identifies the contents of source files cheaply: path, size, modification time."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
