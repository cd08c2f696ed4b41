"""A synthetic photo-size labelled data set: JPEGs in class folders, for training at photo sizes.

    python bench/photos.py OUT [--classes 10] [--per-class 300] [--test-per-class 50] [--size 320x240] [--seed 0]

Writes OUT/train/<class>/NNNN.jpg and OUT/test/<class>/NNNN.jpg, the layout `cnnpipe ingest OUT`
reads as a train and a test split (validation is carved out of train). Each image holds one
object about a third of the frame tall, at a random place, scale (+-20%) and tilt (+-15 degrees),
on a shaded, grainy background among plain distractor shapes. The object's outline and colours
are random; its class is the fine pattern inside it (stripes at three angles, a diagonal crosshatch, checks, dots, rings,
a grid, zigzags, bricks) with a period of an eighth of the object, about 10 px at 320x240. At 96 px
and up the pattern is still there; in a 32 px thumbnail it is a smear of the object's two
colours, so telling the classes apart needs the photo-size input.

Deterministic for a seed: every image draws from its own random stream (seed, split, class,
index), so a data set's images do not depend on how many others are asked for. 3,000 images at
320x240 take about 10 s on one core.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Pattern = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _wave(phase: np.ndarray) -> np.ndarray:
    # A square wave with soft edges: crisp at full size, no jaggies for the JPEG encoder.
    return np.clip(3 * np.sin(2 * np.pi * phase), -1, 1)


def _square(values: np.ndarray, period: float) -> np.ndarray:
    return np.abs((values / period) % 1 - 0.5) * 2  # 0 in the middle of a period, 1 at its edges


PATTERNS: dict[str, Pattern] = {
    "hstripes": lambda u, v, p: _wave(v / p),
    "vstripes": lambda u, v, p: _wave(u / p),
    "diagonal": lambda u, v, p: _wave((u + v) / (p * math.sqrt(2))),
    # Both diagonals, not the other one alone: a class told from another only by its mirror image
    # is undone by the flips every recipe trains with (a first version had "antidiagonal").
    "crosshatch": lambda u, v, p: np.clip(8 * (np.maximum(_square((u + v) / math.sqrt(2), p),
                                                          _square((u - v) / math.sqrt(2), p)) - 0.7), -1, 1),
    "checks": lambda u, v, p: np.clip(9 * np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p), -1, 1),
    "dots": lambda u, v, p: np.clip(8 * (_square(u, p) ** 2 + _square(v, p) ** 2 - 0.5), -1, 1),
    "rings": lambda u, v, p: _wave(np.hypot(u, v) / p),
    "grid": lambda u, v, p: np.clip(8 * (np.maximum(_square(u, p), _square(v, p)) - 0.7), -1, 1),
    "zigzag": lambda u, v, p: _wave((v + p * _square(u, 2 * p)) / p),
    "bricks": lambda u, v, p: np.clip(8 * (np.maximum(_square(v, p), _square(u + p * (v // p % 2), 2 * p)) - 0.8),
                                      -1, 1),
}
CLASSES = tuple(PATTERNS)
SPLITS = ("train", "test")


def _outline(draw: ImageDraw.ImageDraw, kind: int, box: tuple[float, float, float, float], fill) -> None:
    left, top, right, bottom = box
    cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2
    if kind == 0:
        draw.ellipse(box, fill=fill)
    elif kind == 1:
        draw.rounded_rectangle(box, radius=min(rx, ry) / 3, fill=fill)
    else:  # a triangle, diamond, hexagon or five-pointed star
        corners = {2: 3, 3: 4, 4: 6, 5: 10}[kind]
        radii = [1.0, 0.5] * 5 if kind == 5 else [1.0] * corners
        points = [(cx + rx * r * math.sin(2 * math.pi * i / corners), cy - ry * r * math.cos(2 * math.pi * i / corners))
                  for i, r in enumerate(radii)]
        draw.polygon(points, fill=fill)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.integers(40, 216, (3, 4, 3), dtype=np.uint8)
    detail = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    shading = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    mottle = Image.fromarray(detail).resize((width, height), Image.Resampling.BICUBIC)
    image = Image.blend(shading, mottle, 0.25)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):  # clutter: plain shapes and lines, no fine pattern
        side = height * rng.uniform(0.08, 0.22)
        x, y = rng.uniform(-side / 2, width - side / 2), rng.uniform(-side / 2, height - side / 2)
        _outline(draw, int(rng.integers(0, 6)), (x, y, x + side * rng.uniform(0.6, 1.6), y + side), _colour(rng))
    for _ in range(int(rng.integers(2, 5))):
        draw.line([tuple(rng.uniform(0, 1, 2) * (width, height)) for _ in range(2)], fill=_colour(rng),
                  width=int(rng.integers(1, max(2, height // 60))))
    return image


def _object(rng: np.random.Generator, pattern: Pattern, height: float) -> tuple[Image.Image, Image.Image]:
    """The patterned object and its mask, tilted, cut to its bounding box."""
    width = height * rng.uniform(0.75, 1.33)
    w, h = math.ceil(width), math.ceil(height)
    period = height / 8
    shift = rng.uniform(0, 2 * period, 2)  # a random phase; rings stay about the middle
    u, v = np.meshgrid(np.arange(w) - w / 2 + shift[0], np.arange(h) - h / 2 + shift[1])
    mix = (pattern(u, v, period) + 1) / 2
    while True:  # two colours far enough apart in brightness for the pattern to show
        first, second = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        if abs(first @ (0.299, 0.587, 0.114) - second @ (0.299, 0.587, 0.114)) > 90:
            break
    pixels = first * mix[..., None] + second * (1 - mix[..., None])
    mask = Image.new("L", (w, h), 0)
    _outline(ImageDraw.Draw(mask), int(rng.integers(0, 6)), (0, 0, w - 1, h - 1), 255)
    tilt = rng.uniform(-15, 15)
    body = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).rotate(tilt, Image.Resampling.BILINEAR, expand=True)
    return body, mask.rotate(tilt, Image.Resampling.BILINEAR, expand=True)


def render_photo(label: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `label` (an index into CLASSES), `size` = (width, height)."""
    width, height = size
    image = _background(rng, width, height)
    body, mask = _object(rng, PATTERNS[CLASSES[label]], height / 3 * rng.uniform(0.8, 1.2))
    x = int(rng.integers(0, max(1, width - body.width)))
    y = int(rng.integers(0, max(1, height - body.height)))
    image.paste(body, (x, y), mask)
    grain = rng.integers(-8, 9, (height, width, 3), dtype=np.int16)  # sensor noise, uniform for speed
    return Image.fromarray((np.asarray(image, np.int16) + grain).clip(0, 255).astype(np.uint8))


def photo_jpeg(label: int, size: tuple[int, int], rng: np.random.Generator, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    render_photo(label, size, rng).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def write_photo_dataset(out_dir: str | Path, classes: int = 10, per_class: int = 300, test_per_class: int = 50,
                        size: tuple[int, int] = (320, 240), seed: int = 0) -> dict[str, int]:
    """OUT/train/<class>/NNNN.jpg and OUT/test/<class>/NNNN.jpg; returns the images written per split."""
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be between 2 and {len(CLASSES)}, not {classes}")
    if min(size) < 32:
        raise ValueError(f"size must be at least 32x32, not {size[0]}x{size[1]}")
    out_dir = Path(out_dir)
    written = {}
    for split, count in zip(SPLITS, (per_class, test_per_class)):
        for label in range(classes):
            folder = out_dir / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                (folder / f"{index:04d}.jpg").write_bytes(photo_jpeg(label, size, image_rng(seed, split, label, index)))
        written[split] = classes * count
    return written


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, like 320x240, not {text!r}") from None
    return width, height


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=10, help=f"At most {len(CLASSES)}.")
    parser.add_argument("--per-class", type=int, default=300, help="Training images per class.")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--size", type=_size, default=(320, 240), help="WIDTHxHEIGHT, 320x240 by default.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = write_photo_dataset(args.out, args.classes, args.per_class, args.test_per_class, args.size, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{written['train']:,} train and {written['test']:,} test images of {args.classes} classes, "
          f"{args.size[0]}x{args.size[1]}, in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
