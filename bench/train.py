"""Training throughput: the engine fed from the Parquet store against the model alone and torchvision.

    python bench/train.py --device cpu              # 5,000-image CIFAR-10 subset, on this machine
    python bench/train.py --device cuda --subset 0  # all 50,000 training images (bench/gpu.sh)

Figures, all in training images per second (forward, backward and SGD step) unless said
otherwise, measured in the same run with the same batch size, precision and model:
- model-only: random tensors already on the device;
- pipeline: a steady epoch (after 3 warm-up batches) from the Parquet store through cnn.loop
  (decode once, augment on the device); the first-epoch figure adds decoding the split;
- pipeline, streaming: the same steady epoch from `StreamingImages`, the path a split
  larger than the memory budget takes (row groups decoded every epoch, in the background);
- baseline: torchvision ImageFolder + DataLoader (num_workers = cores - 1, PIL
  transforms: RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize)
  over the same JPEGs extracted to a folder;
- norm=lrn with our LRN and with torch.nn.LocalResponseNorm, against norm=batch;
- photo size: alexnet-cifar at 128 px (and 224 on CUDA) from bench/photos.py's 320x240
  JPEGs generated in the run (10 classes; a tenth of --subset a class, 300 with --subset 0,
  but at least four batches in all: 52 a class at a CPU's batch of 128): model-only at that
  size, and the pipeline's steady epoch over the split kept resident, squashed to that size
  (224 decoded at 256 and cropped, as `cnn.train.fit` does);
  plus the decode rate of those JPEGs at 128 px with `decode_images` (CPU threads, whose
  libjpeg-turbo decodes at a reduced scale where one is large enough; nvJPEG too on CUDA).
  These rows' ratios are against model-only alexnet-cifar at the same size;
- alexnet at 224, on its own smaller subset (--alexnet-per-class) ingested with
  `--resize 256`: model-only, the pipeline's steady epoch over the split kept resident at
  256, and the decode ceilings, images/s of `decode_images` at 256 px over the same
  JPEGs (CPU threads; nvJPEG too on CUDA). These rows' ratios are against model-only
  alexnet 224, with half the batch on CUDA and an eighth on a CPU.

Targets: pipeline >= 85% of model-only and >= 5x the baseline on a GPU; on this 2-core
CPU, the pipeline no slower than the baseline; lrn >= 70% of batch; alexnet 224 through
the pipeline >= min(80% of its model-only, 90% of the decode ceiling of its device).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CIFAR = Path(os.environ.get("CNNPIPE_SHARED", REPO.parent / "shared")) / "data" / "cifar10-jpeg.tar.gz"

from bench.photos import write_photo_dataset  # noqa: E402
from cnn import decoding  # noqa: E402
from cnn.augment import Augment, ColourStats  # noqa: E402
from cnn.decoding import decode_images  # noqa: E402
from cnn.device import autocast  # noqa: E402
from cnn.loaders import ResidentImages, StreamingImages  # noqa: E402
from cnn.loop import train_one_epoch  # noqa: E402
from cnn.model import LocalResponseNorm, build_model, decode_size  # noqa: E402
from cnn.splits import StoreSplit  # noqa: E402
from cnn.train import augmentation  # noqa: E402

PHOTO_SIZE = (320, 240)
# Photos a class, of bench/photos.py's 10 classes, with --subset 0; otherwise a tenth of --subset.
# Either way at least PHOTO_BATCHES whole batches in all, so that the steady epoch has some to time.
PHOTOS_PER_CLASS_ALL = 300
PHOTO_BATCHES = 4
PHOTO_DECODE_SIZE = 128


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
             device: torch.device) -> None:
    with autocast(device):
        logits = model(images)
    loss = nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def on_device(model: nn.Module, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = model.to(device, memory_format=torch.channels_last).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def model_only(model: nn.Module, device: torch.device, batch: int, size: int, steps: int) -> float:
    model, optimizer = on_device(model, device)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)

    for _ in range(3):
        sgd_step(model, optimizer, images, labels, device)
    synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        sgd_step(model, optimizer, images, labels, device)
    synchronise(device)
    return steps * batch / (time.perf_counter() - started)


def with_torch_lrn(model: nn.Module) -> nn.Module:
    for index, layer in enumerate(model.features):
        if isinstance(layer, LocalResponseNorm):
            model.features[index] = nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)
    return model


def ingest_subset(folder: Path, home: Path, per_class: int, dataset: str = "cifar10", **options) -> Path:
    """Ingest `per_class` training images per class (all if 0) plus a fifth as many test images;
    `options` are `IngestOptions` fields."""
    os.environ["CNNPIPE_HOME"] = str(home)
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions

    subset = home / "subsets" / dataset
    for split in ("train", "test"):
        for class_dir in sorted((folder / split).iterdir()):
            target = subset / split / class_dir.name
            target.mkdir(parents=True)
            files = sorted(class_dir.iterdir())
            keep = per_class if split == "train" else max(1, per_class // 5)
            # Hard links, not symbolic ones: ingest refuses a symbolic link that leaves the source.
            for path in files[:keep] if per_class else files:
                (target / path.name).hardlink_to(path)
    store = DatasetStore(dataset)
    with store.lock():
        store.commit(store.stage(open_source(str(subset)), IngestOptions(**options)))
    return store.root


def steady_epoch(model: nn.Module, source: ResidentImages | StreamingImages, augment: Augment, device: torch.device,
                 batch: int) -> tuple[float, int]:
    """Images/s and images of one epoch through cnn.loop's train_one_epoch, after the first batches of
    another have warmed up the allocator and cuDNN's choice of kernels: a whole warm-up epoch
    would add minutes on a CPU and measure nothing that three batches of one shape do not."""
    model, optimizer = on_device(model, device)
    generator = torch.Generator(device=device).manual_seed(0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    seen = 0

    def counted():
        nonlocal seen
        for images, labels in source.batches(batch, generator, drop_last=True):
            seen += len(labels)
            yield images, labels

    train_one_epoch(model, itertools.islice(counted(), 3), augment, optimizer, scheduler, generator)
    synchronise(device)
    seen = 0
    started = time.perf_counter()
    train_one_epoch(model, counted(), augment, optimizer, scheduler, generator)
    synchronise(device)
    return seen / (time.perf_counter() - started), seen


def pipeline(dataset: Path, device: torch.device, batch: int) -> tuple[float, float, float, int]:
    """Steady-epoch images/s resident, the same with decoding the split added, and streaming."""
    started = time.perf_counter()
    split = StoreSplit.open(dataset, "train")
    train = ResidentImages.load(split, 32, device)
    stats = ColourStats.from_images(train.images)
    load_seconds = time.perf_counter() - started
    augment = Augment(stats, 32, pad=4)
    steady, images = steady_epoch(build_model("alexnet-cifar", 10, norm="batch"), train, augment, device, batch)
    streaming, _ = steady_epoch(build_model("alexnet-cifar", 10, norm="batch"), StreamingImages(split, 32, device),
                                augment, device, batch)
    return steady, images / (images / steady + load_seconds), streaming, images


def decode_rate(groups: list[list[bytes]], device: torch.device, size: int = 256, fit: str = "crop") -> float:
    """Images/s of `decode_images` at `size` px, one call per row group as `ResidentImages.load` makes them."""
    decode_images(groups[0], size, device, fit)  # starts the thread pool or nvJPEG
    synchronise(device)
    decoded, started = 0, time.perf_counter()
    while decoded == 0 or time.perf_counter() - started < 1.0:  # a small subset decodes in milliseconds
        for blobs in groups:
            decode_images(blobs, size, device, fit)
            decoded += len(blobs)
        synchronise(device)
    return decoded / (time.perf_counter() - started)


def alexnet_rows(folder: Path, home: Path, per_class: int, device: torch.device, batch: int,
                 steps: int) -> list[tuple[str, float, float, str]]:
    """Alexnet at 224 from a store resized to 256 on ingest, against its model-only rate and the decoders."""
    model_rate = model_only(build_model("alexnet", 10), device, batch, 224, steps)
    rows = [(f"model-only alexnet 224, norm=lrn, batch {batch}", model_rate, 1.0, "base of the alexnet 224 rows")]
    # Every image in train: the source has no val/, and a tenth of train would become val.
    dataset = ingest_subset(folder, home, per_class, "cifar10-256", resize=256, val_fraction=0.0)
    split = StoreSplit.open(dataset, "train")
    blobs = [split.read_group(*group)[0] for group in split.row_groups()]
    ceilings = {"CPU threads": decode_rate(blobs, torch.device("cpu"))}
    if device.type == "cuda":
        ceilings["nvJPEG"] = decode_rate(blobs, device)
    train = ResidentImages.load(split, decode_size(224), device)
    augment = Augment(ColourStats.from_images(train.images), 224)
    steady, images = steady_epoch(build_model("alexnet", 10), train, augment, device, batch)
    # ResidentImages.load decodes with nvJPEG on CUDA, with the CPU threads elsewhere.
    ceiling = ceilings["nvJPEG" if device.type == "cuda" else "CPU threads"]
    target = min(0.80 * model_rate, 0.90 * ceiling)
    rows.append((f"pipeline alexnet 224, steady epoch ({images:,} images)", steady, steady / model_rate,
                 f">= min(0.80 of model-only, 0.90 of the decode ceiling) = {target:,.0f} images/s"))
    rows += [(f"decode ceiling 256 px, {decoder}", rate, rate / model_rate, "") for decoder, rate in ceilings.items()]
    return rows


def photo_rows(folder: Path, home: Path, per_class: int, device: torch.device, batch: int, steps: int,
               sizes: tuple[int, ...]) -> list[tuple[str, float, float, str]]:
    """alexnet-cifar at photo-size input from bench/photos.py's 320x240 JPEGs, squashed whole as the
    recipe does for photos, through the pipeline against model-only at the same size; and the
    decode rate of those JPEGs at PHOTO_DECODE_SIZE, against model-only there."""
    write_photo_dataset(folder, per_class=per_class, test_per_class=1, size=PHOTO_SIZE)
    # Every image in train, as for the alexnet 224 rows.
    dataset = ingest_subset(folder, home, per_class, "photos", val_fraction=0.0)
    split = StoreSplit.open(dataset, "train")
    shown = f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}"
    rows = []
    for size in sizes:
        model_rate = model_only(build_model("alexnet-cifar", 10, norm="batch", image_size=size), device, batch, size,
                                steps)
        rows.append((f"model-only alexnet-cifar {size} px, norm=batch", model_rate, 1.0,
                     f"base of the {size} px photo rows"))
        # As `cnn.train.fit` stores and augments them: 224 from 256 px, smaller sizes padded.
        stored = decode_size(size)
        train = ResidentImages.load(split, stored, device, fit="squash")
        augment = augmentation(ColourStats.from_images(train.images), size, stored)
        steady, images = steady_epoch(build_model("alexnet-cifar", 10, norm="batch", image_size=size), train, augment,
                                      device, batch)
        rows.append((f"pipeline alexnet-cifar {size} px from {shown} JPEGs, steady epoch ({images:,} images)", steady,
                     steady / model_rate, ""))
        if size != PHOTO_DECODE_SIZE:
            continue
        groups = [split.read_group(*group)[0] for group in split.row_groups()]
        reduced = decoding._reduced_dims(*PHOTO_SIZE, decoding.resized_dims(*PHOTO_SIZE, size, "squash"))
        decoders = {"CPU threads": torch.device("cpu"), **({"nvJPEG": device} if device.type == "cuda" else {})}
        for decoder, on in decoders.items():
            rate = decode_rate(groups, on, size, "squash")
            scale = "full scale, as 1/2 is under the size" if reduced == PHOTO_SIZE else "reduced scale"
            note = f"libjpeg-turbo decodes at {reduced[0]}x{reduced[1]}, {scale}" if on.type == "cpu" else ""
            rows.append((f"decode {shown} JPEGs to {size} px, {decoder}", rate, rate / model_rate, note))
    return rows


def baseline(folder: Path, device: torch.device, batch: int) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=max(1, (os.cpu_count() or 2) - 1),
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    model, optimizer = on_device(build_model("alexnet-cifar", 10, norm="batch"), device)
    seen = 0
    started = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        sgd_step(model, optimizer, images, labels.to(device, non_blocking=True), device)
        seen += len(labels)
    synchronise(device)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--subset", type=int, default=500, help="training images per class (0: all 5,000)")
    parser.add_argument("--alexnet-per-class", type=int, default=None,
                        help="training images per class for the alexnet 224 rows (default: 500 on CUDA, 8 on a CPU, "
                             "where alexnet 224 trains tens of images a second; 0 skips the rows)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="model-only steps per figure")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch_size or (512 if device.type == "cuda" else 128)
    steps = args.steps or (50 if device.type == "cuda" else 10)
    alexnet_per_class = args.alexnet_per_class if args.alexnet_per_class is not None \
        else 500 if device.type == "cuda" else 8
    if not CIFAR.exists():
        raise SystemExit(f"{CIFAR} is missing: this benchmark needs ../shared beside the checkout")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        with tarfile.open(CIFAR) as tar:
            tar.extractall(scratch / "cifar10", filter="data")
        dataset = ingest_subset(scratch / "cifar10", scratch / "home", args.subset)
        model_rate = model_only(build_model("alexnet-cifar", 10, norm="batch"), device, batch, 32, steps)
        rows.append(("model-only alexnet-cifar, norm=batch", model_rate, 1.0, ""))
        steady, first, streaming, images = pipeline(dataset, device, batch)
        rows.append((f"pipeline, steady epoch ({images:,} images)", steady, steady / model_rate, ">= 0.85 of model-only"))
        rows.append(("pipeline, first epoch incl. decoding", first, first / model_rate, ""))
        rows.append(("pipeline, streaming, steady epoch", streaming, streaming / model_rate, ""))
        base = baseline(scratch / "home" / "subsets" / "cifar10" / "train", device, batch)
        rows.append(("baseline ImageFolder + DataLoader", base, base / model_rate,
                     f"pipeline {steady / base:.2f}x baseline (GPU >= 5x, CPU >= 1x)"))
        lrn = model_only(build_model("alexnet-cifar", 10, norm="lrn"), device, batch, 32, steps)
        rows.append(("model-only norm=lrn, ours", lrn, lrn / model_rate, ">= 0.70 of norm=batch"))
        torch_lrn = model_only(with_torch_lrn(build_model("alexnet-cifar", 10, norm="lrn")), device, batch, 32, steps)
        rows.append(("model-only norm=lrn, torch.nn.LRN", torch_lrn, torch_lrn / model_rate, ""))
        photos_per_class = max(args.subset // 10 or PHOTOS_PER_CLASS_ALL, -(-PHOTO_BATCHES * batch // 10))
        photo_sizes = (PHOTO_DECODE_SIZE, 224) if device.type == "cuda" else (PHOTO_DECODE_SIZE,)
        rows += photo_rows(scratch / "photos", scratch / "home", photos_per_class, device, batch, steps, photo_sizes)
        if alexnet_per_class:
            # Alexnet 224 does ~50x alexnet-cifar's work per image: a smaller batch keeps a CPU's rows to seconds.
            alexnet_batch = batch // 2 if device.type == "cuda" else batch // 8
            rows += alexnet_rows(scratch / "cifar10", scratch / "home", alexnet_per_class, device, alexnet_batch, steps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\nTraining benchmark on {name}, batch {batch}, torch {torch.__version__}\n")
    width = max(len(row[0]) for row in rows)
    print(f"| {'figure':<{width}} | {'images/s':>10} | {'x model-only':>12} | target")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 14}|-------")
    for label, rate, ratio, target in rows:
        print(f"| {label:<{width}} | {rate:>10,.0f} | {ratio:>12.2f} | {target}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "batch": batch, "torch": torch.__version__, "baseline": "model-only alexnet-cifar",
            "rows": [{"figure": label, "images_per_second": rate, "ratio": ratio, "target": target}
                     for label, rate, ratio, target in rows]}, indent=2))


if __name__ == "__main__":
    main()
