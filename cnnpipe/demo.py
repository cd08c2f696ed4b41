"""A small, real image set for the demo: rendered shapes with noise, as JPEG and PNG files."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")


def render_shape(shape: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 24, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in (255 - background + rng.integers(-40, 41, 3)) % 256)
    radius = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif shape in ("square", "triangle"):
        corners = 4 if shape == "square" else 3
        points = [(cx + radius * math.cos(angle + 2 * math.pi * k / corners),
                   cy + radius * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)]
        draw.polygon(points, fill=colour)
    else:
        width = max(2, int(radius / 2.5))
        for theta in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(theta), radius * math.sin(theta)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=width)
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_demo_images(root: Path, per_class: int = 150, archive_per_class: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """Write `root/shapes/<class>/*.{jpg,png}` and `root/more-shapes.tar`; same seed, same bytes."""
    rng = np.random.default_rng(seed)
    folder = root / "shapes"
    for shape in SHAPES:
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            fmt, suffix = ("JPEG", "jpg") if index % 2 == 0 else ("PNG", "png")
            (folder / shape / f"{index:04d}.{suffix}").write_bytes(encode(render_shape(shape, rng), fmt))
    # Two bad files, so the demo shows how rejects are reported.
    good = (folder / SHAPES[0] / "0000.jpg").read_bytes()
    (folder / SHAPES[0] / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / SHAPES[1] / "notes.jpg").write_text("this is a text file, not an image\n")
    archive = root / "more-shapes.tar"
    with tarfile.open(archive, "w") as tar:
        for shape in SHAPES:
            for index in range(archive_per_class):
                data = encode(render_shape(shape, rng), "JPEG")
                info = tarfile.TarInfo(f"{shape}/extra-{index:04d}.jpg")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return folder, archive
