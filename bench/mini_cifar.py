"""A few hundred images laid out like cifar10-jpeg.tar.gz, for `bench/gpu.sh --dry-run`.

    python bench/mini_cifar.py OUT.tar.gz [--train-per-class N] [--test-per-class N]

Takes the first files per class of ../shared/data/cifar10-jpeg.tar.gz (or $CNNPIPE_SHARED),
or, on a fresh clone without ../shared, writes seeded noise JPEGs under the same ten class
names: the dry run checks that every step of the GPU script runs, not what it measures.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.recipe import CIFAR, read_cifar  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def noise_jpeg(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def synthetic_cifar(train_per_class: int, test_per_class: int) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    rng = np.random.default_rng(0)
    counts = {"train": train_per_class, "test": test_per_class}
    return {split: {label: [(f"{index:04d}.jpg", noise_jpeg(rng)) for index in range(count)] for label in CLASSES}
            for split, count in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=10)
    args = parser.parse_args()
    real = CIFAR.exists()
    images = (read_cifar if real else synthetic_cifar)(args.train_per_class, args.test_per_class)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.output, "w:gz") as tar:
        for split, classes in images.items():
            for label, files in classes.items():
                for name, data in files:
                    member = tarfile.TarInfo(f"{split}/{label}/{name}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    written = sum(len(files) for classes in images.values() for files in classes.values())
    print(f"{args.output}: {written} {'CIFAR-10' if real else 'synthetic noise'} JPEGs")


if __name__ == "__main__":
    main()
