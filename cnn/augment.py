"""Augmentation and normalisation, batched on the training device.

The paper's random crop and horizontal flip (padding-crop at 32x32) and its PCA colour
noise, drawn with the colour statistics computed once from the training split
(`colour_stats_for`); `normalise`, `centre_crop` and `ten_crops` for evaluation and inference.

Batches stay uint8, 0-255, through decoding, cropping and padding; only `Augment` and
`normalise` turn them into floats, in [0, 1].
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cnn.splits import StoreSplit

# The paper's colour noise: standard deviation of the per-image eigenvalue multipliers.
LIGHTING_STD = 0.1


# ---- statistics computed once from the training split --------------------------------

@dataclass(frozen=True)
class ColourTensors:
    mean: torch.Tensor  # (1, 3, 1, 1), to broadcast over a batch
    std: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


@dataclass
class ColourStats:
    mean: list[float]
    std: list[float]
    eigenvalues: list[float]
    eigenvectors: list[list[float]]

    def __post_init__(self) -> None:
        # Outside the dataclass fields, so `asdict` (checkpoints, the JSON cache) never sees it.
        self._on_device: dict[tuple[torch.device, torch.dtype], ColourTensors] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> ColourTensors:
        """The statistics as tensors on `device`, built once: a tensor made from Python lists
        is a blocking host-to-device copy, which would otherwise stall every training step."""
        key = (device, dtype)
        if key not in self._on_device:
            tensor = functools.partial(torch.tensor, dtype=dtype, device=device)
            self._on_device[key] = ColourTensors(tensor(self.mean)[None, :, None, None],
                                                 tensor(self.std)[None, :, None, None],
                                                 tensor(self.eigenvalues), tensor(self.eigenvectors))
        return self._on_device[key]

    @classmethod
    def from_images(cls, images: torch.Tensor, max_pixels: int = 4_000_000, seed: int = 0) -> ColourStats:
        """Per-channel mean and std, and the RGB covariance's eigen-decomposition (pixels in [0, 1])."""
        count, _, height, width = images.shape
        if count * height * width > max_pixels:
            generator = torch.Generator(device=images.device).manual_seed(seed)
            flat = torch.randint(0, count * height * width, (max_pixels,), generator=generator, device=images.device)
            # Gathered in place: a split kept resident may fill most of the memory budget, and
            # flattening it into a pixel list first would copy all of it.
            pixels = images[flat // (height * width), :, flat // width % height, flat % width]
        else:
            pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
        pixels = pixels.double() / 255.0
        covariance = torch.cov(pixels.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        return cls(pixels.mean(0).tolist(), pixels.std(0).tolist(),
                   eigenvalues.clamp_min(0).tolist(), eigenvectors.tolist())


def colour_stats_for(split: StoreSplit, images: torch.Tensor, seed: int = 0) -> ColourStats:
    """The training split's colour statistics, computed once per dataset version and kept beside it."""
    cache = split.stats_dir / f"colour-{split.version_id}.json" if split.stats_dir else None
    if cache is not None and cache.exists():
        return ColourStats(**json.loads(cache.read_text()))
    stats = ColourStats.from_images(images, seed=seed)
    if cache is not None:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(stats)))
        os.replace(tmp, cache)
    return stats


# ---- augmentation, batched on the device ---------------------------------------------

class Augment:
    """Random crop + flip + PCA lighting, then normalisation, for a uint8 batch on the device."""

    def __init__(self, stats: ColourStats, crop: int, pad: int = 0, lighting: float = LIGHTING_STD,
                 flip: bool = True):
        self.crop, self.pad, self.lighting, self.flip = crop, pad, lighting, flip
        self.stats = stats

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 shard: tuple[int, int] | None = None) -> torch.Tensor:
        """With `shard=(rank, world)`, `images` is this rank's slice of a global batch: the
        draws are made for all of it, so every rank's generator stays in step with the
        others' and no two ranks give their images the same crops."""
        batch = images.shape[0]
        rank, world = shard or (0, 1)
        mine = slice(rank * batch, (rank + 1) * batch)
        device = images.device
        if self.pad:
            images = F.pad(images, (self.pad,) * 4, mode="reflect")
        height, width = images.shape[2:]
        top = torch.randint(0, height - self.crop + 1, (batch * world,), generator=generator, device=device)[mine]
        left = torch.randint(0, width - self.crop + 1, (batch * world,), generator=generator, device=device)[mine]
        base = torch.arange(self.crop, device=device)
        rows, cols = (top[:, None] + base), (left[:, None] + base)
        if self.flip:
            flipped = torch.rand(batch * world, generator=generator, device=device)[mine] < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        images = images[torch.arange(batch, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
        if self.lighting:
            alphas = torch.randn(batch * world, 3, generator=generator, device=device)[mine] * self.lighting
            colour = self.stats.on(device, images.dtype)
            shift = (alphas * colour.eigenvalues) @ colour.eigenvectors.T
            images = images + shift[:, :, None, None]
        return normalise(images, self.stats)


def normalise(images: torch.Tensor, stats: ColourStats) -> torch.Tensor:
    """Float images in [0, 1] (or uint8) to zero mean and unit variance per channel."""
    if not images.dtype.is_floating_point:
        images = images.float().div_(255.0)
    colour = stats.on(images.device, images.dtype)
    return ((images - colour.mean) / colour.std).contiguous(memory_format=torch.channels_last)


def centre_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = images.shape[2:]
    top, left = (height - crop) // 2, (width - crop) // 2
    return images[:, :, top:top + crop, left:left + crop]


def ten_crops(images: torch.Tensor, crop: int) -> list[torch.Tensor]:
    """The paper's test-time patches: four corners and the centre, each also flipped."""
    height, width = images.shape[2:]
    if (height, width) == (crop, crop):  # small images: patch from a reflect-padded copy
        images = F.pad(images, (max(1, crop // 8),) * 4, mode="reflect")
        height, width = images.shape[2:]
    corners = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop),
               ((height - crop) // 2, (width - crop) // 2)]
    patches = [images[:, :, top:top + crop, left:left + crop] for top, left in corners]
    return patches + [patch.flip(3) for patch in patches]
