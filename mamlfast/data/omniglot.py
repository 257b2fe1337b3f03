"""Omniglot in its distributed form: ``images_background`` and ``images_evaluation``, each a
folder or a zip of ``<Alphabet>/<character>/<image>.png``.

All 1623 characters are pooled and split with a fixed seed into 1150 training, 50 validation
and 423 test classes, as the MAML++ reference does; a root with another number of classes is
split in the same proportions. Images are resized to the configured size and inverted, so
that ink is bright (255) on a dark (0) background.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .images import ClassImages, DatasetError, ImageSource, cached, decode_classes, fingerprint, open_zip

PARTS = ("images_background", "images_evaluation")
SPLIT_CLASSES = {"train": 1150, "val": 50, "test": 423}
SPLIT_SEED = 0
FETCH_HINT = "mamlfast train --download fetches the two zips there"


def load_omniglot(root: str | Path, image_size: int = 28, progress=iter) -> dict[str, ClassImages]:
    """The train/val/test splits of the Omniglot at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Omniglot root {root} does not exist or is not a folder ({FETCH_HINT})")
    sources = [_part_source(root, part) for part in PARTS]
    classes = [c for source in sources for c in _list_classes(source)]
    if not classes:
        raise DatasetError(f"no Omniglot images found under {root}")
    files = [p for s in sources for p in ([s] if s.is_file() else sorted(s.rglob("*.png")))]
    all_classes = cached("omniglot", dict(root=fingerprint(files), size=image_size),
                         lambda: _invert(decode_classes(classes, image_size, "L", progress)))
    return split_classes(all_classes)


def split_classes(all_classes: ClassImages) -> dict[str, ClassImages]:
    """A fixed random partition of the classes in the proportions of ``SPLIT_CLASSES``."""
    total = all_classes.num_classes
    order = torch.randperm(total, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    reference_total = sum(SPLIT_CLASSES.values())
    train = round(total * SPLIT_CLASSES["train"] / reference_total)
    val = round(total * SPLIT_CLASSES["val"] / reference_total)
    bounds = {"train": (0, train), "val": (train, train + val), "test": (train + val, total)}
    return {split: all_classes.select(order[start:stop]) for split, (start, stop) in bounds.items()}


def _part_source(root: Path, part: str) -> Path:
    for candidate in (root / part, root / f"{part}.zip"):
        if candidate.exists():
            return candidate
    raise DatasetError(f"Omniglot root {root} holds neither {part}/ nor {part}.zip ({FETCH_HINT})")


def _list_classes(source: Path) -> list[tuple[str, list[ImageSource]]]:
    """(``Alphabet/character``, its images) for every character of a folder or zip, sorted."""
    by_class: dict[str, list[ImageSource]] = {}
    if source.is_file():
        with open_zip(str(source)) as archive:
            members = [m for m in archive.namelist() if m.lower().endswith(".png")]
        for member in members:
            parts = Path(member).parts
            if len(parts) < 3:
                raise DatasetError(f"unexpected file {member} in {source}: expected <Alphabet>/<character>/<image>.png")
            by_class.setdefault("/".join(parts[-3:-1]), []).append(ImageSource(str(source), member))
    else:
        for path in source.glob("*/*/*.png"):
            by_class.setdefault(f"{path.parent.parent.name}/{path.parent.name}", []).append(ImageSource(str(path)))
    return [(name, sorted(by_class[name], key=str)) for name in sorted(by_class)]


def _invert(classes: ClassImages) -> ClassImages:
    return ClassImages(255 - classes.images, classes.counts, classes.names)

