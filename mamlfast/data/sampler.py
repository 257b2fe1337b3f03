"""Few-shot tasks drawn by indexing one image tensor, each meta-batch determined by a seed.

A meta-batch is a pure function of (seed, stream, index): training batch i comes from
(seed, "train", i), evaluation task j from (EVAL_SEED, split, j). A resumed run therefore
continues the same sequence, validation and test tasks never change, and any process can
draw any slice of any batch without drawing the rest of the sequence first.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import MAMLConfig
from ..tasks import TaskBatch
from .images import ClassImages, DatasetError

EVAL_SEED = 0
STREAMS = {"train": 0, "val": 1, "test": 2}


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed mixes ``keys`` (SeedSequence: nearby keys give unrelated streams)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class TaskSampler:
    """N-way tasks with K support and Q query images per class from the classes of ``split``.

    Images stay uint8 until a batch is drawn; a batch is normalised with ``mean``/``std`` (per
    channel, on the [0, 1] scale) on ``device``. With ``rotate``, each class of a task is rotated
    by its own random multiple of 90 degrees, making it a new class. The images are held on
    ``data_device`` (by default ``device``): on the host, as ``split`` holds them (a cached data
    set's read-only mapping, never copied whole); on a GPU, the split's own images copied there
    once. Held on the host for a run on a GPU, each batch's images are gathered into pinned
    memory and copied to the device without waiting for it.
    """

    def __init__(self, split: ClassImages, cfg: MAMLConfig, *, name: str, mean, std, rotate: bool,
                 device: torch.device | str = "cpu", data_device: torch.device | str | None = None):
        self.n_way, self.k_shot, self.k_query = cfg.n_way, cfg.k_shot, cfg.k_query
        per_class = cfg.k_shot + cfg.k_query
        where = f" ({split.origin})" if split.origin else ""
        if split.num_classes < cfg.n_way:
            raise DatasetError(f"the {name} split{where} has {split.num_classes} classes, fewer than n_way={cfg.n_way}")
        fewest = int(split.counts.min())
        if fewest < per_class:
            poorest = split.names[int(split.counts.argmin())]
            raise DatasetError(f"class {poorest} of the {name} split has {fewest} images, fewer than "
                               f"k_shot + k_query = {cfg.k_shot} + {cfg.k_query}")
        self.name, self.rotate = name, rotate
        self.device = _indexed(torch.device(device))
        data_device = self.device if data_device is None else torch.device(data_device)
        held = split if data_device.type == "cpu" else split.packed(data_device)
        self.images, self.counts, self.offsets = held.pool, held.counts, held.offsets
        channels = split.pool.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(channels, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(channels, 1, 1)

    def draw(self, generator: torch.Generator, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image indices [B, N, K+Q] and rotations [B, N] (multiples of 90 degrees) of B tasks."""
        classes = torch.rand(num_tasks, len(self.counts), generator=generator).argsort(-1)[:, :self.n_way]
        counts = self.counts[classes]  # [B, N]
        keys = torch.rand(num_tasks, self.n_way, int(self.counts.max()), generator=generator)
        keys[torch.arange(keys.shape[-1]) >= counts.unsqueeze(-1)] = 2.0  # a class's missing images sort last
        picks = keys.argsort(-1)[..., :self.k_shot + self.k_query]
        rotations = torch.randint(4, (num_tasks, self.n_way), generator=generator)
        if not self.rotate:
            rotations.zero_()
        return self.offsets[classes].unsqueeze(-1) + picks, rotations

    def batch(self, indices: torch.Tensor, rotations: torch.Tensor) -> TaskBatch:
        """The tasks of ``draw``'s indices and rotations, normalised, on the sampler's device."""
        rotations = self._to_device(rotations)
        tasks, ways, per_class = indices.shape
        x = (self._gather(indices).float() / 255 - self.mean) / self.std  # [B, N, K+Q, C, H, W]
        if self.rotate:
            # all four rotations, then each class's own: no data-dependent control flow
            turned = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])
            x = turned[rotations, torch.arange(tasks, device=self.device).unsqueeze(1),
                       torch.arange(ways, device=self.device)]
        labels = torch.arange(ways, device=self.device).view(1, ways, 1).expand(tasks, ways, per_class)

        def part(t, start, stop):  # [B, N, K+Q, ...] -> [B, N*(stop-start), ...]
            return t[:, :, start:stop].flatten(1, 2)

        k = self.k_shot
        return TaskBatch(part(x, 0, k), part(labels, 0, k), part(x, k, per_class), part(labels, k, per_class))

    def _gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``indices`` [B, N, K+Q], on the sampler's device: [B, N, K+Q, C, H, W]."""
        if self.images.device == self.device:
            return self.images[self._to_device(indices)]
        # held on the host for a run on a GPU: the copy waits for nothing, and the pinned block is
        # not reused before it is done (PyTorch's host allocator records the copy's stream on it)
        staged = torch.empty((indices.numel(), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        torch.index_select(self.images, 0, indices.reshape(-1), out=staged)
        return staged.to(self.device, non_blocking=True).view(*indices.shape, *self.images.shape[1:])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host indices to the device without waiting for the work queued there."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def training_batch(self, seed: int, iteration: int, num_tasks: int, tasks: slice = slice(None)) -> TaskBatch:
        """Meta-batch ``iteration`` of the run seeded ``seed``, or the slice ``tasks`` of it."""
        indices, rotations = self.draw(seeded_generator(seed, STREAMS["train"], iteration), num_tasks)
        return self.batch(indices[tasks], rotations[tasks])

    def fixed_tasks(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and rotations of the ``count`` fixed evaluation tasks of this split."""
        drawn = [self.draw(seeded_generator(EVAL_SEED, STREAMS[self.name], task), 1) for task in range(count)]
        return torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index, as the tensors made there report it: "cuda" is the current CUDA device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
