"""mini-ImageNet in the ``<root>/{train,val,test}/<wnid>/<image>.jpg`` layout (64/16/20 classes)."""

from __future__ import annotations

from pathlib import Path

from .images import ClassImages, DatasetError, ImageSource, cached, decode_classes, fingerprint

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# ImageNet channel statistics, on the [0, 1] scale
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_mini_imagenet(root: str | Path, image_size: int = 84, progress=iter) -> dict[str, ClassImages]:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"mini-ImageNet root {root} does not exist or is not a folder")
    splits = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(f"mini-ImageNet root {root} has no {split}/ folder")
        classes = [(d.name, sorted(ImageSource(str(p)) for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
                   for d in sorted(folder.iterdir()) if d.is_dir()]
        classes = [(name, sources) for name, sources in classes if sources]
        if not classes:
            raise DatasetError(f"no images found under {folder}")
        files = [Path(s.path) for _, sources in classes for s in sources]
        splits[split] = cached(f"mini-imagenet-{split}", dict(files=fingerprint(files), size=image_size),
                               lambda: decode_classes(classes, image_size, "RGB", progress),
                               classes, (3, image_size, image_size))
    return splits
