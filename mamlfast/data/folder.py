"""Any data set arranged as one folder per class, in the image formats Pillow reads.

Layouts of the root folder:

- ``<root>/{train,val,test}/<class>/<image>``: split folders of class folders (mini-ImageNet,
  CIFAR-FS, FC100, tiered-ImageNet and CUB as usually arranged);
- ``<root>/<class>/<image>`` with a split file: a JSON object naming the classes of each split,
  ``{"train": [...], "val": [...], "test": [...]}``, each class a folder under the root, named by
  its path relative to the root (``"Alphabet/character"`` names a nested one). Classes the file
  does not name are not read.

A class's images are the files of its folder whose extension Pillow reads (in any case); other
files, folders inside a class folder, and names that start with a dot are passed over. A class
is named by its folder's path. Images are converted to grayscale ("L") for one channel and to
RGB for three, and resized to the image size (as ``images.decode`` does).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .cache import Source, cached, fingerprint
from .images import ClassImages, DatasetError, ImageSource, decode_classes

SPLITS = ("train", "val", "test")
LAYOUT_HINT = "a folder data set is <root>/{train,val,test}/<class>/<image>, or one folder of classes with --split-file"


def load_folder(root: str | Path, image_size: int, channels: int, progress=iter,
                split_file: str | Path | None = None) -> dict[str, ClassImages]:
    """The train/val/test splits of the folder data set at ``root`` (see the module), as images of
    ``channels`` (1 or 3) channels and ``image_size`` pixels square."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a folder")
    if split_file is None:
        listed, origins = _list_splits(root), {split: str(root / split) for split in SPLITS}
    else:
        split_file = Path(split_file).expanduser().resolve()
        listed, origins = _list_split_file(root, split_file), {split: f"split file {split_file}" for split in SPLITS}
    classes = [entry for split in SPLITS for entry in listed[split]]
    mode = "L" if channels == 1 else "RGB"
    source = Source("folder", dict(root=str(root), split_file=split_file and str(split_file)),
                    dict(image_size=image_size, mode=mode),
                    fingerprint(s.path for _, sources in classes for s in sources), (channels, image_size, image_size))
    every_class = cached(source, lambda: classes, lambda listed: decode_classes(listed, image_size, mode, progress))
    splits, first = {}, 0
    for split in SPLITS:
        splits[split] = every_class.select(range(first, first + len(listed[split])), origins[split])
        first += len(listed[split])
    return splits


def _list_splits(root: Path) -> dict[str, list[tuple[str, list[ImageSource]]]]:
    """The classes (folder path, images) of each split folder of ``root``."""
    listed = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(f"{root} has no {split}/ folder: {LAYOUT_HINT}")
        entries = _visible(folder)
        stray = next((entry.path for entry in entries if entry.is_file() and _is_image(entry.name)), None)
        if stray is not None:
            raise DatasetError(f"image {stray} lies in a split folder, not in a class folder: {LAYOUT_HINT}")
        listed[split] = _checked(split, [(entry.path, _images(entry.path)) for entry in entries if entry.is_dir()],
                                 str(folder))
    return listed


def _list_split_file(root: Path, split_file: Path) -> dict[str, list[tuple[str, list[ImageSource]]]]:
    """The classes (folder path, images) of each split that ``split_file`` names under ``root``."""
    try:
        named = json.loads(split_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise DatasetError(f"cannot read split file {split_file}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"split file {split_file} is not valid JSON: {error}") from None
    if not isinstance(named, dict) or sorted(named) != sorted(SPLITS) or not all(
            isinstance(names, list) and all(isinstance(name, str) and name for name in names)
            for names in named.values()):
        raise DatasetError(f"split file {split_file} must hold a JSON object with the keys train, val and test, "
                           f"each a list of class folders relative to the data root")
    listed, seen = {}, {}
    for split in SPLITS:
        classes = []
        for name in named[split]:
            folder = os.path.normpath(root / name)
            if folder in seen:
                raise DatasetError(f"split file {split_file} names the class {name} twice ({seen[folder]} and {split})")
            seen[folder] = split
            if not os.path.isdir(folder):
                raise DatasetError(f"split file {split_file} names the {split} class {name}, but {folder} is not a "
                                   f"folder")
            classes.append((folder, _images(folder)))
        listed[split] = _checked(split, classes, f"split file {split_file}")
    return listed


def _checked(split: str, classes: list[tuple[str, list[ImageSource]]], where: str) -> list:
    if not any(sources for _, sources in classes):
        raise DatasetError(f"the {split} split is empty: {where} gives it no class folders with images")
    return classes


def _images(folder: str) -> list[ImageSource]:
    return [ImageSource(entry.path) for entry in _visible(folder) if entry.is_file() and _is_image(entry.name)]


def _visible(folder: str | Path) -> list[os.DirEntry]:
    """The entries of ``folder`` whose names do not start with a dot, sorted by name."""
    with os.scandir(folder) as entries:
        return sorted((entry for entry in entries if not entry.name.startswith(".")), key=lambda entry: entry.name)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _image_suffixes()


@lru_cache(maxsize=None)
def _image_suffixes() -> frozenset[str]:
    """The file name extensions of the formats Pillow can open, in lower case."""
    return frozenset(suffix.lower() for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN)
