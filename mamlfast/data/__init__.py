"""Few-shot data sets, decoded once into a cache file that every process maps, and the task sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..config import MAMLConfig
from ..files import shown
from . import folder, mini_imagenet, omniglot
from .folder import load_folder
from .images import ClassImages, DatasetError, image_paths
from .mini_imagenet import load_mini_imagenet
from .omniglot import ClassSplit, load_omniglot
from .sampler import TaskSampler
from .synthetic import make_synthetic

DATASETS = ("synthetic", "omniglot", "mini-imagenet", "folder")
# load_dataset's keyword options, which a run records to read its data again the same way
DATA_OPTIONS = ("class_split", "split_seed", "split_fractions", "pixels", "split_file", "image_mean", "image_std")
# On a GPU the data set is held on the device where it takes at most this share of the device
# memory free when it loads, leaving the rest to training; otherwise on the host (see TaskSampler).
DEVICE_SHARE = 0.25


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
    _holders: dict = field(default_factory=dict, init=False, repr=False)  # device -> where its runs hold the images

    def sampler(self, split: str, cfg: MAMLConfig, device: torch.device | str = "cpu") -> TaskSampler:
        return TaskSampler(self.splits[split], cfg, name=split, mean=self.mean, std=self.std,
                           rotate=self.rotate_train and split == "train", device=device,
                           data_device=self.data_device(device))

    @property
    def nbytes(self) -> int:
        """The bytes of all the splits' images."""
        return sum(int(s.counts.sum()) * s.pool[0].numel() for s in self.splits.values())

    def data_device(self, device: torch.device | str) -> torch.device:
        """Where a run on ``device`` holds the images: on a GPU, there if they take at most
        ``DEVICE_SHARE`` of its free memory, else on the host; decided once per device, so that
        every split follows the same choice."""
        device = torch.device(device)
        if device.type != "cuda":
            return torch.device("cpu")
        if device not in self._holders:
            free = torch.cuda.mem_get_info(device)[0]
            self._holders[device] = device if self.nbytes <= DEVICE_SHARE * free else torch.device("cpu")
        return self._holders[device]

    def placement(self, device: torch.device | str) -> str:
        """The images, and where a run on ``device`` holds them, in words."""
        images = sum(int(s.counts.sum()) for s in self.splits.values())
        shape = "x".join(map(str, next(iter(self.splits.values())).pool.shape[1:]))
        what = f"{images:,} images of {shape}, {self.nbytes / 2**20:,.2f} MiB"
        if self.data_device(device).type == "cuda":
            return f"{what}, held on {device}"
        if torch.device(device).type == "cuda":
            return (f"{what}, held on the host and copied to {device} per meta-batch (more than "
                    f"{DEVICE_SHARE:.0%} of its free memory)")
        return f"{what}, held on the host"


def load_dataset(name: str, cfg: MAMLConfig, root: str | Path | None = None, progress=iter, *,
                 class_split: str | None = None, split_seed: int = omniglot.SPLIT_SEED,
                 split_fractions: Sequence[float] = omniglot.REFERENCE_FRACTIONS,
                 pixels: str = "mamlfast", split_file: str | Path | None = None,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None) -> FewShotDataset:
    """The data set ``name`` at ``root``, with images of ``cfg``'s size and channel count.

    For Omniglot, ``class_split`` ("mamlfast" or "reference"; by default the one of the root's
    layout), ``split_seed``, ``split_fractions`` and ``pixels`` are as in ``mamlfast.data.omniglot``.
    mini-ImageNet's classes are split by its folders, as the reference code splits them, and its
    pixels are handled as the reference's; the synthetic set has its own split. A folder data set
    (``mamlfast.data.folder``) is split by its folders or by ``split_file``, and normalised with
    ``image_mean`` and ``image_std`` (per channel, on the [0, 1] scale), by default its training
    classes' own statistics, which its ``options`` then record.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {shown(repr(name))}; choose one of {', '.join(DATASETS)}")
    given = [option for option, value in dict(split_file=split_file, image_mean=image_mean,
                                              image_std=image_std).items() if value is not None]
    if name != "folder" and given:
        raise DatasetError(f"{', '.join(given)} applies to the folder dataset (--dataset folder), not to {name}")
    if name == "synthetic":
        if root is not None:
            raise DatasetError(f"the synthetic dataset is built in and reads no data root, but {root} was given")
        splits = make_synthetic(cfg.seed, cfg.image_size, cfg.image_channels)
        return FewShotDataset(name, splits, (0.0,) * cfg.image_channels, (1.0,) * cfg.image_channels, False)
    if root is None:
        raise DatasetError(f"the {name} dataset needs a data root (--data-root)")
    if name == "folder":
        return _load_folder(cfg, root, progress, split_file, image_mean, image_std)
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


def _load_folder(cfg: MAMLConfig, root: str | Path, progress, split_file, image_mean, image_std) -> FewShotDataset:
    if cfg.image_channels not in (1, 3):
        raise DatasetError(f"a folder dataset is read with 1 channel (grayscale) or 3 (RGB), but "
                           f"MAMLConfig.image_channels={cfg.image_channels}")
    splits = load_folder(root, cfg.image_size, cfg.image_channels, progress, split_file)
    if image_mean is None and image_std is None:
        image_mean, image_std = splits["train"].statistics()
        if min(image_std) == 0:
            raise DatasetError(f"the training images of {root} are uniform in a channel (standard deviation 0): "
                               f"there is nothing to learn from them")
    mean, std = _checked_statistics(image_mean, image_std, cfg.image_channels)
    options = dict(image_mean=list(mean), image_std=list(std))
    if split_file is not None:
        options["split_file"] = str(Path(split_file).expanduser().resolve())
    return FewShotDataset("folder", splits, mean, std, False, options)


def _checked_statistics(mean, std, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` and ``std`` as tuples of floats, one per channel, checked."""
    for option, values in (("image_mean", mean), ("image_std", std)):
        if values is None or len(values) != channels or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise DatasetError(f"{option}={values!r}: must be {channels} finite number(s), one per channel "
                               f"(give image_mean and image_std together, or neither)")
    if min(std) <= 0:
        raise DatasetError(f"image_std={std!r}: must be positive")
    return tuple(map(float, mean)), tuple(map(float, std))


def infer_dataset(root: str | Path, split_file: str | Path | None = None) -> str:
    """The dataset that the folder ``root`` holds, told from its layout: "omniglot"
    (images_background and images_evaluation, as folders or zips, or one folder per alphabet),
    "mini-imagenet" (train/, val/ and test/ folders of 64, 16 and 20 classes), or "folder" (other
    split folders of classes, or any root with a ``split_file``). Raise ``DatasetError`` when the
    layout says none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist or is not a folder")
    if split_file is not None:
        return "folder"
    parts = any((root / part).exists() or (root / f"{part}.zip").exists() for part in omniglot.PARTS)
    split_folders = [split for split in folder.SPLITS if (root / split).is_dir()]
    if parts and split_folders:
        raise DatasetError(f"cannot tell which dataset {root} holds: it has both Omniglot's parts and split folders "
                           f"({', '.join(split_folders)}); name it with --dataset")
    if parts:
        return "omniglot"
    if split_folders:
        classes = [sum(entry.is_dir() and not entry.name.startswith(".") for entry in (root / split).iterdir())
                   if split in split_folders else 0 for split in folder.SPLITS]
        return "mini-imagenet" if classes == list(mini_imagenet.SPLIT_CLASSES.values()) else "folder"
    if next(image_paths(root, "*/*/*", omniglot.SUFFIXES), None) is not None:
        return "omniglot"
    raise DatasetError(f"cannot tell which dataset {root} holds: it has neither Omniglot's images_background "
                       f"and images_evaluation (or <Alphabet>/<character>/<image>.png) nor train, val and test "
                       f"folders of classes; name it with --dataset, or give one folder of classes a --split-file")


__all__ = ["DATASETS", "DATA_OPTIONS", "DEVICE_SHARE", "ClassImages", "ClassSplit", "DatasetError", "FewShotDataset",
           "TaskSampler", "infer_dataset", "load_dataset", "load_folder"]
