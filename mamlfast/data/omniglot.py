"""Omniglot in its distributed form, or as one folder of all alphabets as the MAML++ reference code reads it.

Layouts of the root folder:

- ``"parts"``: ``images_background`` and ``images_evaluation``, each a folder or a zip of
  ``<Alphabet>/<character>/<image>.png`` (the distributed form);
- ``"alphabets"``: ``<Alphabet>/<character>/<image>.png`` for all 50 alphabets in one folder
  (the layout of the reference implementation, AntreasAntoniou/HowToTrainYourMAMLPytorch).

A class is a character, named ``Alphabet/character`` in either layout. ``ClassSplit`` says how
the classes are split into training, validation and test classes:

- ``"mamlfast"``: the classes in listing order (the background part, then the evaluation part,
  each sorted by name), permuted by ``torch.randperm`` seeded with ``seed``, and cut 1150/50/423
  (in proportion, for a root with another number of classes). The default for the parts layout.
- ``"reference"``: the reference code's split, class for class and in its order: the names
  sorted, shuffled by numpy's ``RandomState`` seeded the way the reference derives its seed from
  its ``val_seed`` (``seed`` here), and cut at ``int(f0 * N)`` and ``int((f0 + f1) * N)`` for
  ``fractions`` (f0, f1, ...); the test classes are the rest. The default for the alphabets
  layout and for the reference's experiment configs.

``pixels`` says how images become tensors: ``"mamlfast"`` converts to greyscale, resizes with
LANCZOS and inverts, so that smooth ink is bright (255) on a dark (0) background; ``"reference"``
resizes the 1-bit image in its own mode (Pillow does so nearest-neighbour) and keeps it binary,
ink dark (0) on a bright (255) background, as the reference code feeds it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..files import shown
from .cache import Source, cached, fingerprint
from .images import ClassImages, DatasetError, ImageSource, decode_classes, has_suffix, image_paths, open_zip

PARTS = ("images_background", "images_evaluation")
SUFFIXES = (".png",)  # in any case
SPLIT_CLASSES = {"train": 1150, "val": 50, "test": 423}
SPLIT_SEED = 0
CLASS_SPLITS = ("mamlfast", "reference")
PIXELS = ("mamlfast", "reference")
# The reference's train_val_test_split for Omniglot (its int() cuts give 1150/50/423 of 1623 classes).
REFERENCE_FRACTIONS = (0.70918052988, 0.03080714725, 0.2606284658)
FETCH_HINT = "mamlfast train --download fetches the two zips there"


@dataclass(frozen=True)
class ClassSplit:
    """How the classes are split into training, validation and test classes (see the module)."""

    method: str = "mamlfast"
    seed: int = SPLIT_SEED
    fractions: tuple[float, ...] = REFERENCE_FRACTIONS  # the "reference" method's

    def __post_init__(self) -> None:
        if self.method not in CLASS_SPLITS:
            raise DatasetError(f"unknown class split {shown(repr(self.method))}; choose one of "
                               f"{', '.join(CLASS_SPLITS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise DatasetError(f"the class split's seed must be an integer in [0, 2**32), got {shown(repr(self.seed))}")
        fractions = self.fractions
        if (not 2 <= len(fractions) <= 3
                or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1 for f in fractions)
                or fractions[0] + fractions[1] > 1):
            raise DatasetError(f"the class split's fractions must be 2 or 3 numbers in [0, 1], the first two "
                               f"summing to at most 1 (train, val; the test classes are the rest), got "
                               f"{shown(repr(fractions))}")

    def options(self) -> dict:
        """This split as ``load_dataset`` options."""
        options = dict(class_split=self.method, split_seed=self.seed)
        if self.method == "reference":
            options["split_fractions"] = list(self.fractions)
        return options

    def indices(self, names: list[str]) -> dict[str, list[int]]:
        """For each split, the indices into ``names`` of its classes, in the split's order."""
        total = len(names)
        if self.method == "mamlfast":
            order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed)).tolist()
            reference_total = sum(SPLIT_CLASSES.values())
            train_end = round(total * SPLIT_CLASSES["train"] / reference_total)
            val_end = train_end + round(total * SPLIT_CLASSES["val"] / reference_total)
        else:
            by_name = sorted(range(total), key=names.__getitem__)
            # the reference seeds its shuffle with a number drawn from its val_seed
            shuffle_seed = np.random.RandomState(self.seed).randint(1, 999999)
            shuffled = np.arange(total, dtype=np.int32)
            np.random.RandomState(shuffle_seed).shuffle(shuffled)
            order = [by_name[i] for i in shuffled.tolist()]
            train_end = int(self.fractions[0] * total)
            val_end = int(np.sum(self.fractions[:2]) * total)
        return {"train": order[:train_end], "val": order[train_end:val_end], "test": order[val_end:]}


def layout(root: str | Path) -> str:
    """The layout of the Omniglot at ``root``: ``"parts"`` or ``"alphabets"`` (see the module)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Omniglot root {root} does not exist or is not a folder ({FETCH_HINT})")
    if any((root / part).exists() or (root / f"{part}.zip").exists() for part in PARTS):
        return "parts"
    if next(image_paths(root, "*/*/*", SUFFIXES), None) is not None:
        return "alphabets"
    raise DatasetError(f"Omniglot root {root} holds neither {PARTS[0]}/ nor {PARTS[0]}.zip, nor one folder per "
                       f"alphabet (<Alphabet>/<character>/<image>.png) ({FETCH_HINT})")


def default_split(root: str | Path) -> ClassSplit:
    """The class split used unless one is asked for: the reference's for its own layout."""
    return ClassSplit("reference" if layout(root) == "alphabets" else "mamlfast")


def source_files(root: str | Path) -> list[Path]:
    """The files that hold the Omniglot at ``root``: the parts' zips, or every image."""
    root = Path(root)
    if layout(root) == "alphabets":
        return sorted(image_paths(root, "*/*/*", SUFFIXES))
    sources = [_part_source(root, part) for part in PARTS]
    return [p for s in sources for p in ([s] if s.is_file() else sorted(image_paths(s, "**/*", SUFFIXES)))]


def list_classes(root: str | Path) -> tuple[list[tuple[str, list[ImageSource]]], list[Path]]:
    """Every class of the Omniglot at ``root`` as (``Alphabet/character``, its images), in listing
    order, and the files that hold them (``source_files``)."""
    root = Path(root)
    files = source_files(root)
    if layout(root) == "alphabets":
        classes = _group((path, ImageSource(str(path))) for path in files)
    else:
        classes = [c for part in PARTS for c in _list_part(_part_source(root, part))]
    if not classes:
        raise DatasetError(f"no Omniglot images found under {root}")
    twice = [name for name, count in Counter(name for name, _ in classes).items() if count > 1]
    if twice:
        raise DatasetError(f"Omniglot root {root} holds the character {twice[0]} in both {PARTS[0]} and {PARTS[1]}")
    return classes, files


def load_omniglot(root: str | Path, image_size: int = 28, progress=iter, class_split: ClassSplit | None = None,
                  pixels: str = "mamlfast") -> dict[str, ClassImages]:
    """The train/val/test splits of the Omniglot at ``root``; ``class_split`` defaults to ``default_split``."""
    if pixels not in PIXELS:
        raise DatasetError(f"unknown Omniglot pixels {shown(repr(pixels))}; choose one of {', '.join(PIXELS)}")
    split = class_split or default_split(root)
    reference_pixels = pixels == "reference"

    def decode(classes):
        decoded = decode_classes(classes, image_size, "L", progress, resize_first=reference_pixels)
        return decoded if reference_pixels else (255 - image for image in decoded)  # ink bright on black

    source = Source("omniglot", dict(root=str(Path(root).resolve()), layout=layout(root)),
                    dict(image_size=image_size, pixels=pixels), fingerprint(source_files(root)),
                    (1, image_size, image_size))
    all_classes = cached(source, lambda: list_classes(root)[0], decode)
    return {name: all_classes.select(indices) for name, indices in split.indices(all_classes.names).items()}


def _part_source(root: Path, part: str) -> Path:
    for candidate in (root / part, root / f"{part}.zip"):
        if candidate.exists():
            return candidate
    raise DatasetError(f"Omniglot root {root} holds neither {part}/ nor {part}.zip ({FETCH_HINT})")


def _list_part(source: Path) -> list[tuple[str, list[ImageSource]]]:
    """(``Alphabet/character``, its images) for every character of a part's folder or zip."""
    if source.is_dir():
        return _group((path, ImageSource(str(path))) for path in image_paths(source, "*/*/*", SUFFIXES))
    with open_zip(str(source)) as archive:
        members = [m for m in archive.namelist() if has_suffix(m, SUFFIXES)]
    for member in members:
        if len(Path(member).parts) < 3:
            raise DatasetError(f"unexpected file {member} in {source}: expected <Alphabet>/<character>/<image>.png")
    return _group((Path(member), ImageSource(str(source), member)) for member in members)


def _group(images: Iterable[tuple[Path, ImageSource]]) -> list[tuple[str, list[ImageSource]]]:
    """Images (path, source) grouped by class, named after their alphabet and character folders; sorted."""
    by_class: dict[str, list[ImageSource]] = {}
    for path, source in images:
        by_class.setdefault(f"{path.parent.parent.name}/{path.parent.name}", []).append(source)
    return [(name, sorted(by_class[name], key=str)) for name in sorted(by_class)]
