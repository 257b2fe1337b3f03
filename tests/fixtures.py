"""Small data sets generated on the fly in the layouts of the real ones."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def _glyph(rng: np.random.Generator, size: int) -> Image.Image:
    """Black strokes on white, 1 bit, like Omniglot's PNGs."""
    pixels = np.ones((size, size), dtype=bool)
    for _ in range(3):
        row, col = rng.integers(2, size - 2, 2)
        pixels[row, max(0, col - 6):col + 6] = False
        pixels[max(0, row - 6):row + 6, col] = False
    return Image.fromarray(pixels)


def make_omniglot(root: Path, alphabets=(("Alpha", 20), ("Beta", 20)), evaluation=(("Gamma", 20),),
                  images_per_class: int = 4, size: int = 35, zipped: bool = False, seed: int = 0,
                  suffixes: tuple[str, ...] = (".png",)) -> Path:
    """``root``/images_background and images_evaluation (folders, or zips with ``zipped``); the images'
    file names end in ``suffixes`` in turn."""
    rng = np.random.default_rng(seed)
    for part, letters in (("images_background", alphabets), ("images_evaluation", evaluation)):
        for alphabet, characters in letters:
            for c in range(characters):
                folder = root / part / alphabet / f"character{c + 1:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(images_per_class):
                    _glyph(rng, size).save(folder / f"{c:04d}_{i + 1:02d}{suffixes[i % len(suffixes)]}")
        if zipped:
            with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
                for path in sorted(p for p in (root / part).rglob("*") if p.is_file()):
                    archive.write(path, path.relative_to(root).as_posix())
            shutil.rmtree(root / part)
    return root


MINI_IMAGENET_CLASSES = (("train", 64), ("val", 16), ("test", 20))


def make_mini_imagenet(root: Path, classes=(("train", 6), ("val", 5), ("test", 5)), images_per_class: int = 4,
                       size: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in classes:
        for c in range(count):
            folder = root / split / f"n{split[:2]}{c:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.jpg", quality=90)
    return root


def full_disk(monkeypatch, name: str) -> None:
    """Make mamlfast's writes of the files called ``name`` (a glob), and of their temporary files, fail
    as on a full disk: once created, such a file's descriptor is made /dev/full's, to which the kernel
    answers every write with ENOSPC, so that the real error path runs."""
    import fnmatch
    import os
    import re

    import pytest

    from mamlfast import files
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    create = files._create

    def create_on_a_full_disk(path, flags):
        descriptor = create(path, flags)
        if fnmatch.fnmatch(re.sub(r"\.[0-9a-f]{8}\.tmp$", "", os.path.basename(path)), name):
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, descriptor)
            os.close(full)
        return descriptor
    monkeypatch.setattr(files, "_create", create_on_a_full_disk)


# (extension, PIL mode) of a folder data set's images, in turn: grayscale, colour, palette and
# opaque-alpha images in several formats, extensions in either case
FOLDER_FORMATS = (("png", "L"), ("JPG", "RGB"), ("bmp", "RGB"), ("gif", "P"), ("Png", "RGBA"), ("tiff", "RGB"))


def make_folder(root: Path, classes=(("train", 6), ("val", 5), ("test", 5)), images_per_class: int = 4,
                seed: int = 0) -> Path:
    """A folder data set: ``root``/<split>/<class>/<image> for each (split, classes), or
    ``root``/<class>/<image> for a split of None; images of odd sizes in the FOLDER_FORMATS."""
    rng = np.random.default_rng(seed)
    made = 0
    for split, count in classes:
        for c in range(count):
            folder = root / split / f"{split}-class{c}" if split else root / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_class):
                suffix, mode = FOLDER_FORMATS[made % len(FOLDER_FORMATS)]
                made += 1
                width, height = (int(n) for n in rng.integers(7, 40, 2))
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert(mode)
                if mode == "RGBA":
                    image.putalpha(255)
                image.save(folder / f"image{i}.{suffix}")
    return root
