"""Few-shot data sets loaded once into memory, and the task sampler that indexes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MAMLConfig
from . import mini_imagenet
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


__all__ = ["DATASETS", "ClassImages", "DatasetError", "FewShotDataset", "TaskSampler", "load_dataset"]
