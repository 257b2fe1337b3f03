"""mini-ImageNet in the ``<root>/{train,val,test}/<wnid>/<image>.jpg`` layout (64/16/20 classes), a folder data set."""

from __future__ import annotations

from pathlib import Path

from .folder import load_folder
from .images import ClassImages

SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
# ImageNet channel statistics, on the [0, 1] scale
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_mini_imagenet(root: str | Path, image_size: int = 84, progress=iter) -> dict[str, ClassImages]:
    return load_folder(root, image_size, 3, progress)
