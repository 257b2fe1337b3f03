"""Class-labelled images held as one uint8 tensor, decoded from folders or zips (cached by ``cache.py``)."""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from ..files import first_line

# PIL modes that convert to "L" and "RGB" as they should; 16-bit grayscale and alpha are handled apart
_PLAIN_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class DatasetError(ValueError):
    """A data set is missing, malformed, corrupt or too small for the tasks asked of it."""


@dataclass
class ClassImages:
    """The images of some classes: class c's are rows ``offsets[c] : offsets[c] + counts[c]`` of
    ``pool`` [rows, C, H, W] uint8 (by default, class after class from row 0).

    ``pool`` may hold other classes' images too: the splits of a cached data set are views of one
    read-only mapping of its cache file, which every process that reads it shares, so nothing may
    write to it. ``moments`` [classes, 2, C] int64, where known, are each class's per-channel sums
    of its pixel values and of their squares; ``origin`` says where the classes were found, for
    messages.
    """

    pool: torch.Tensor
    counts: torch.Tensor
    names: list[str]
    offsets: torch.Tensor | None = None
    moments: torch.Tensor | None = None
    origin: str | None = None

    def __post_init__(self) -> None:
        if self.offsets is None:
            self.offsets = torch.cumsum(self.counts, 0) - self.counts

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def images(self) -> torch.Tensor:
        """The classes' images alone, class after class: [sum(counts), C, H, W] (a copy, unless
        they lie in one run of ``pool``'s rows)."""
        blocks = self.blocks()
        if len(blocks) == 1:
            start, rows = blocks[0]
            return self.pool[start:start + rows]
        return torch.cat([self.pool[start:start + rows] for start, rows in blocks]) if blocks else self.pool[:0]

    def blocks(self) -> list[tuple[int, int]]:
        """The runs of ``pool``'s rows that hold the classes' images, in class order, as (first
        row, rows): classes that follow each other in ``pool`` share a run."""
        blocks: list[list[int]] = []
        for start, rows in zip(self.offsets.tolist(), self.counts.tolist()):
            if blocks and blocks[-1][0] + blocks[-1][1] == start:
                blocks[-1][1] += rows
            elif rows:
                blocks.append([start, rows])
        return [(start, rows) for start, rows in blocks]

    def packed(self, device: torch.device | str) -> "ClassImages":
        """These classes alone, their images class after class in a new pool on ``device``,
        copied run by run (no copy of the whole on the host)."""
        pool = torch.empty((int(self.counts.sum()), *self.pool.shape[1:]), dtype=torch.uint8, device=device)
        row = 0
        for start, rows in self.blocks():
            pool[row:row + rows].copy_(self.pool[start:start + rows])
            row += rows
        return ClassImages(pool, self.counts, self.names, moments=self.moments, origin=self.origin)

    def select(self, classes: Iterable[int], origin: str | None = None) -> "ClassImages":
        """The classes ``classes``, in that order, found at ``origin`` (by default, this one's): a
        view of the same pool."""
        classes = torch.tensor(list(classes), dtype=torch.int64)
        return ClassImages(self.pool, self.counts[classes], [self.names[c] for c in classes.tolist()],
                           self.offsets[classes], None if self.moments is None else self.moments[classes],
                           origin or self.origin)

    def statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The per-channel mean and standard deviation of the classes' pixels, on the [0, 1]
        scale, from their ``moments``."""
        if self.moments is None:
            raise ValueError("these images carry no pixel moments to compute their statistics from")
        pixels = float(self.counts.sum()) * self.pool.shape[2] * self.pool.shape[3] * 255 ** 2
        sums = self.moments.sum(0, dtype=torch.float64)  # [2, C]
        mean = sums[0] * 255 / pixels
        variance = (sums[1] / pixels - mean ** 2).clamp_min(0)
        return tuple(mean.tolist()), tuple(variance.sqrt().tolist())


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
                   progress: Callable[[Iterable], Iterable] = iter, resize_first: bool = False) -> Iterator[np.ndarray]:
    """Every image of every class (name, sources), class after class, as ``decode`` gives it."""
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for _, sources in progress(classes):
            for source in sources:
                archive = None
                if source.member is not None:
                    if source.path not in archives:
                        archives[source.path] = open_zip(source.path)
                    archive = archives[source.path]
                yield decode(source, archive, size, mode, resize_first)
    finally:
        for archive in archives.values():
            archive.close()


def open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"corrupt zip file {path}: {error}") from None
