"""CPU decoding of photo-size JPEGs: libjpeg-turbo's reduced-scale decode against decoding every pixel.

    python bench/decode.py [--images N] [--quick] [--json PATH]   # N per photo size, 1,000 by default

Decodes N synthetic photos (bench/photos.py, JPEG quality 90) of each of 320x240, 500x375
and 640x480 to 128 px and to 224 px (shorter side, centre crop) with `cnn.decoding.decode_images`
on the CPU, in calls of 256 images as `ResidentImages.load` makes them, its thread pool using
every core this process may, two ways:
- full: every pixel decoded, then one bilinear resize (how `decode_images` worked before);
- reduced: libjpeg-turbo decodes at the smallest 1/2, 1/4 or 1/8 scale still at least as
  large as the resize needs ("decoded at" says which), then the same resize.
Figures are images/s, the best of --repeats passes, and the PSNR of the reduced output
against the full one over the same images (above 30 dB is what a test asks of it; "same"
where no reduced scale is large enough, so both ways decode every pixel).
--quick: 200 images per size, 1 pass, a smoke check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.photos import CLASSES, image_rng, photo_jpeg  # noqa: E402
from cnn import decoding  # noqa: E402

SOURCES = ((320, 240), (500, 375), (640, 480))
TARGETS = (128, 224)
CALL = 256  # images per decode_images call, a row group's worth


@contextlib.contextmanager
def every_pixel_decoded():
    """`decode_images` as it was: no reduced scale, for the baseline."""
    reduced_dims = decoding._reduced_dims
    decoding._reduced_dims = lambda width, height, needed: (width, height)
    try:
        yield
    finally:
        decoding._reduced_dims = reduced_dims


def decode_all(blobs: list[bytes], size: int) -> torch.Tensor:
    return torch.cat([decoding.decode_images(blobs[start:start + CALL], size) for start in range(0, len(blobs), CALL)])


def rate(blobs: list[bytes], size: int, repeats: int) -> tuple[float, torch.Tensor]:
    best, images = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        images = decode_all(blobs, size)
        best = min(best, time.perf_counter() - started)
    return len(blobs) / best, images


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Decibels; None for identical images (no reduced scale was possible)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return None if mse == 0 else float(10 * np.log10(255**2 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="Photos per source size (default 1,000).")
    parser.add_argument("--repeats", type=int, default=None, help="Passes per figure, the best kept (default 3).")
    parser.add_argument("--quick", action="store_true", help="200 images per size, one pass.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this file.")
    args = parser.parse_args()
    count = args.images or (200 if args.quick else 1_000)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    for width, height in SOURCES:
        blobs = [photo_jpeg(index % len(CLASSES), (width, height), image_rng(0, "test", index % len(CLASSES), index))
                 for index in range(count)]
        for size in TARGETS:
            decode_all(blobs[:CALL], size)  # starts the thread pool, warms the caches
            with every_pixel_decoded():
                full, expected = rate(blobs, size, repeats)
            reduced, images = rate(blobs, size, repeats)
            scaled = decoding._reduced_dims(width, height, decoding.resized_dims(width, height, size, "crop"))
            rows.append({"source": f"{width}x{height}", "size": size, "decoded_at": f"{scaled[0]}x{scaled[1]}",
                         "full_images_per_second": full, "reduced_images_per_second": reduced,
                         "ratio": reduced / full, "psnr_db": psnr(images, expected)})
    threads = decoding.DECODE_THREADS
    print(f"\nJPEG decoding on the CPU ({threads} thread{'s' * (threads > 1)}), {count:,} photos per size, "
          f"best of {repeats}, shorter side to the size and centre crop\n")
    print(f"| {'source':>7} | {'to px':>5} | {'decoded at':>10} | {'full img/s':>10} | {'reduced img/s':>13} "
          f"| {'reduced/full':>12} | {'PSNR dB':>7} |")
    print(f"|{'-' * 9}|{'-' * 7}|{'-' * 12}|{'-' * 12}|{'-' * 15}|{'-' * 14}|{'-' * 9}|")
    for row in rows:
        quality = "same" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        print(f"| {row['source']:>7} | {row['size']:>5} | {row['decoded_at']:>10} "
              f"| {row['full_images_per_second']:>10,.0f} | {row['reduced_images_per_second']:>13,.0f} "
              f"| {row['ratio']:>12.2f} | {quality:>7} |")
    if args.json:
        args.json.write_text(json.dumps({
            "device": f"CPU, {os.cpu_count()} cores", "threads": threads, "images_per_size": count,
            "repeats": repeats, "torch": torch.__version__, "baseline": "full decode", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
