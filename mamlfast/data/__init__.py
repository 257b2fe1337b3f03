"""Few-shot data sets loaded once into memory, and the task sampler that indexes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..config import MAMLConfig
from ..files import shown
from . import mini_imagenet, omniglot
from .images import ClassImages, DatasetError, image_paths
from .mini_imagenet import load_mini_imagenet
from .omniglot import ClassSplit, load_omniglot
from .sampler import TaskSampler
from .synthetic import make_synthetic

DATASETS = ("synthetic", "omniglot", "mini-imagenet")
# load_dataset's keyword options, which a run records to read its data again the same way
DATA_OPTIONS = ("class_split", "split_seed", "split_fractions", "pixels")


@dataclass
class FewShotDataset:
    """The train/val/test class splits of a data set, with how to normalise and augment it.

    ``options`` are the ``load_dataset`` keyword arguments that read it again the same way.
    """

    name: str
    splits: dict[str, ClassImages]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rotate_train: bool
    options: dict = field(default_factory=dict)

    def sampler(self, split: str, cfg: MAMLConfig, device: torch.device | str = "cpu") -> TaskSampler:
        return TaskSampler(self.splits[split], cfg, name=split, mean=self.mean, std=self.std,
                           rotate=self.rotate_train and split == "train", device=device)


def load_dataset(name: str, cfg: MAMLConfig, root: str | Path | None = None, progress=iter, *,
                 class_split: str | None = None, split_seed: int = omniglot.SPLIT_SEED,
                 split_fractions: Sequence[float] = omniglot.REFERENCE_FRACTIONS,
                 pixels: str = "mamlfast") -> FewShotDataset:
    """The data set ``name`` at ``root``, with images of ``cfg``'s size and channel count.

    For Omniglot, ``class_split`` ("mamlfast" or "reference"; by default the one of the root's
    layout), ``split_seed``, ``split_fractions`` and ``pixels`` are as in ``mamlfast.data.omniglot``.
    mini-ImageNet's classes are split by its folders, as the reference code splits them, and its
    pixels are handled as the reference's; the synthetic set has its own split.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {shown(repr(name))}; choose one of {', '.join(DATASETS)}")
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
        split = ClassSplit(class_split or omniglot.default_split(root).method, split_seed, tuple(split_fractions))
        splits = load_omniglot(root, cfg.image_size, progress, split, pixels)
        return FewShotDataset(name, splits, (0.0,), (1.0,), True, dict(split.options(), pixels=pixels))
    return FewShotDataset(name, load_mini_imagenet(root, cfg.image_size, progress),
                          mini_imagenet.MEAN, mini_imagenet.STD, False)


def infer_dataset(root: str | Path) -> str:
    """The dataset that the folder ``root`` holds, told from its layout: "omniglot"
    (images_background and images_evaluation, as folders or zips, or one folder per alphabet)
    or "mini-imagenet" (train/, val/ and test/ folders). Raise ``DatasetError`` when the layout says neither."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a folder")
    found = []
    if any((root / part).exists() or (root / f"{part}.zip").exists() for part in omniglot.PARTS) \
            or next(image_paths(root, "*/*/*", omniglot.SUFFIXES), None) is not None:
        found.append("omniglot")
    if any((root / split).is_dir() for split in mini_imagenet.SPLITS):
        found.append("mini-imagenet")
    if not found:
        raise DatasetError(f"cannot tell which dataset {root} holds: it has neither Omniglot's images_background "
                           f"and images_evaluation (or <Alphabet>/<character>/<image>.png) nor mini-ImageNet's "
                           f"train, val and test; name it with --dataset")
    if len(found) > 1:
        raise DatasetError(f"cannot tell which dataset {root} holds: it has the layouts of both Omniglot and "
                           f"mini-ImageNet; name it with --dataset")
    return found[0]


__all__ = ["DATASETS", "DATA_OPTIONS", "ClassImages", "ClassSplit", "DatasetError", "FewShotDataset", "TaskSampler",
           "infer_dataset", "load_dataset"]
