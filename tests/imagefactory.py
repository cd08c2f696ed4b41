"""Real encoded images for tests, built with Pillow: every bad and unusual case we accept or refuse."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def jpeg(seed: int = 0, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    return encode(noise_image(seed, size, mode), "JPEG", quality=90)


def png(seed: int = 0, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    return encode(noise_image(seed, size, mode), "PNG")


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def write_class_folders(root: Path, classes: dict[str, int], seed: int = 0, split: str | None = None) -> list[bytes]:
    """`root/[split/]<class>/<n>.jpg` with distinct images; returns their bytes."""
    written = []
    for offset, (label, count) in enumerate(sorted(classes.items())):
        folder = root / split / label if split else root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            data = jpeg(seed * 100_000 + offset * 1_000 + index)
            (folder / f"{index:04d}.jpg").write_bytes(data)
            written.append(data)
    return written
