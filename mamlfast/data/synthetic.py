"""A built-in few-shot set of procedural glyphs, so that training runs with no data at all.

Each class is a random polyline of a few strokes; each of its images redraws the polyline
under a small random rotation, scaling and shift, with each vertex jittered. Everything is
drawn from ``seed``: the same seed gives the same images.
"""

from __future__ import annotations

import math

import torch

from .images import ClassImages

SPLIT_CLASSES = {"train": 800, "val": 100, "test": 200}
IMAGES_PER_CLASS = 20
STROKES = 4
STROKE_WIDTH = 0.04  # in units of the image side


def make_synthetic(seed: int = 0, image_size: int = 28, channels: int = 1,
                   images_per_class: int = IMAGES_PER_CLASS) -> dict[str, ClassImages]:
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for split, num_classes in SPLIT_CLASSES.items():
        glyphs = 0.15 + 0.7 * torch.rand(num_classes, STROKES + 1, 2, generator=generator)
        images = torch.cat([_draw(_vary(chunk, images_per_class, generator), image_size)
                            for chunk in glyphs.split(50)])
        # [classes, images, H, W] -> [classes * images, C, H, W]
        images = images.flatten(0, 1).unsqueeze(1).expand(-1, channels, -1, -1).contiguous()
        counts = torch.full((num_classes,), images_per_class, dtype=torch.int64)
        splits[split] = ClassImages(images, counts, [f"glyph{split}{i:04d}" for i in range(num_classes)])
    return splits


def _vary(glyphs: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """[G, V, 2] vertices -> [G, count, V, 2]: each glyph redrawn ``count`` times with variation."""
    shape = (glyphs.shape[0], count)
    angle = (torch.rand(shape, generator=generator) - 0.5) * (math.pi / 6)
    scale = 0.85 + 0.3 * torch.rand(shape, generator=generator)
    shift = (torch.rand(*shape, 1, 2, generator=generator) - 0.5) * 0.16
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    transform = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [G, count, 2, 2]
    centred = glyphs.unsqueeze(1) - 0.5
    jitter = 0.025 * torch.randn(*shape, glyphs.shape[1], 2, generator=generator)
    return 0.5 + (centred + jitter) @ transform.transpose(-1, -2) + shift


def _draw(vertices: torch.Tensor, size: int) -> torch.Tensor:
    """[G, I, V, 2] polylines -> [G, I, size, size] uint8 images, ink 255 on 0."""
    centres = (torch.arange(size) + 0.5) / size
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij")[::-1], -1).reshape(-1, 2)  # [P, 2] as (x, y)
    start, end = vertices[:, :, :-1, None, :], vertices[:, :, 1:, None, :]  # [G, I, S, 1, 2]
    direction = end - start
    along = ((grid - start) * direction).sum(-1) / (direction ** 2).sum(-1).clamp_min(1e-8)
    nearest = start + along.clamp(0, 1).unsqueeze(-1) * direction  # [G, I, S, P, 2]
    distance = (grid - nearest).norm(dim=-1).amin(dim=2)  # [G, I, P]
    ink = (1.5 - distance / STROKE_WIDTH).clamp(0, 1)
    return (ink * 255).round().to(torch.uint8).view(*vertices.shape[:2], size, size)
