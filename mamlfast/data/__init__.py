"""Few-shot data sets loaded once into memory, and the task sampler that indexes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MAMLConfig
from . import mini_imagenet, omniglot
from .images import ClassImages, DatasetError
from .mini_imagenet import load_mini_imagenet
from .omniglot import load_omniglot
from .sampler import TaskSampler
from .synthetic import make_synthetic

DATASETS = ("synthetic", "omniglot", "mini-imagenet")


@dataclass
class FewShotDataset:
    """The train/val/test class splits of a data set, with how to normalise and augment it."""

    name: str
    splits: dict[str, ClassImages]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rotate_train: bool

    def sampler(self, split: str, cfg: MAMLConfig, device: torch.device | str = "cpu") -> TaskSampler:
        return TaskSampler(self.splits[split], cfg, name=split, mean=self.mean, std=self.std,
                           rotate=self.rotate_train and split == "train", device=device)


def load_dataset(name: str, cfg: MAMLConfig, root: str | Path | None = None, progress=iter) -> FewShotDataset:
    """The data set ``name`` at ``root``, with images of ``cfg``'s size and channel count."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
        if root is not None:
            raise DatasetError(f"the synthetic dataset is built in and reads no data root, but {root} was given")
        splits = make_synthetic(cfg.seed, cfg.image_size, cfg.image_channels)
        return FewShotDataset(name, splits, (0.0,) * cfg.image_channels, (1.0,) * cfg.image_channels, False)
    if root is None:
        raise DatasetError(f"the {name} dataset needs a data root (--data-root)")
    channels = 1 if name == "omniglot" else 3
    if cfg.image_channels != channels:
        raise DatasetError(f"{name} images have {channels} channel(s), but MAMLConfig.image_channels="
                           f"{cfg.image_channels}")
    if name == "omniglot":
        return FewShotDataset(name, load_omniglot(root, cfg.image_size, progress), (0.0,), (1.0,), True)
    return FewShotDataset(name, load_mini_imagenet(root, cfg.image_size, progress),
                          mini_imagenet.MEAN, mini_imagenet.STD, False)


def infer_dataset(root: str | Path) -> str:
    """The dataset that the folder ``root`` holds, told from its layout: "omniglot"
    (images_background and images_evaluation, as folders or zips) or "mini-imagenet"
    (train/, val/ and test/ folders). Raise ``DatasetError`` when the layout says neither."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a folder")
    found = []
    if any((root / part).exists() or (root / f"{part}.zip").exists() for part in omniglot.PARTS):
        found.append("omniglot")
    if any((root / split).is_dir() for split in mini_imagenet.SPLITS):
        found.append("mini-imagenet")
    if not found:
        raise DatasetError(f"cannot tell which dataset {root} holds: it has neither Omniglot's images_background "
                           f"and images_evaluation nor mini-ImageNet's train, val and test; name it with --dataset")
    if len(found) > 1:
        raise DatasetError(f"cannot tell which dataset {root} holds: it has the layouts of both Omniglot and "
                           f"mini-ImageNet; name it with --dataset")
    return found[0]


__all__ = ["DATASETS", "ClassImages", "DatasetError", "FewShotDataset", "TaskSampler", "infer_dataset",
           "load_dataset"]
