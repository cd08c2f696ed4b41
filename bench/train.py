"""Training throughput: the engine fed from the Parquet store against the model alone and torchvision.

    python bench/train.py --device cpu              # 5,000-image CIFAR-10 subset, on this machine
    python bench/train.py --device cuda --subset 0  # all 50,000 training images (bench/gpu.sh)

Figures, all in training images per second (forward, backward and SGD step), measured in
the same run with the same batch size, precision and model:
- model-only: random tensors already on the device;
- pipeline: one epoch from the Parquet store through cnn.train (decode once, augment on
  the device); the first-epoch figure includes decoding the split;
- baseline: torchvision ImageFolder + DataLoader (num_workers = cores - 1, PIL
  transforms: RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize)
  over the same JPEGs extracted to a folder;
- norm=lrn with our LRN and with torch.nn.LocalResponseNorm, against norm=batch.

Targets: pipeline >= 85% of model-only and >= 5x the baseline on a GPU; on this 2-core
CPU, the pipeline no slower than the baseline; lrn >= 70% of batch.
"""

from __future__ import annotations

import argparse
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

from cnn.data import Augment, ColourStats, ResidentImages, StoreSplit  # noqa: E402
from cnn.model import LocalResponseNorm, build_model  # noqa: E402
from cnn.train import autocast, train_one_epoch  # noqa: E402


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


def model_only(model: nn.Module, device: torch.device, batch: int, size: int, steps: int) -> float:
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
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


def ingest_subset(folder: Path, home: Path, per_class: int) -> Path:
    """Ingest `per_class` training images per class (all if 0) plus the test split."""
    os.environ["CNNPIPE_HOME"] = str(home)
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions

    subset = home / "subset"
    for split in ("train", "test"):
        for class_dir in sorted((folder / split).iterdir()):
            target = subset / split / class_dir.name
            target.mkdir(parents=True)
            files = sorted(class_dir.iterdir())
            keep = per_class if split == "train" else per_class // 5
            # Hard links, not symbolic ones: ingest refuses a symbolic link that leaves the source.
            for path in files[:keep] if per_class else files:
                (target / path.name).hardlink_to(path)
    store = DatasetStore("cifar10")
    with store.lock():
        store.commit(store.stage(open_source(str(subset)), IngestOptions()))
    return store.root


def pipeline(dataset: Path, device: torch.device, batch: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    split = StoreSplit.open(dataset, "train")
    train = ResidentImages.load(split, 32, device)
    stats = ColourStats.from_images(train.images)
    load_seconds = time.perf_counter() - started
    model = build_model("alexnet-cifar", 10, norm="batch").to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    augment = Augment(stats, 32, pad=4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    train_one_epoch(model, train.batches(batch, generator, drop_last=True), augment, optimizer, scheduler, generator)
    synchronise(device)
    started = time.perf_counter()
    metrics = train_one_epoch(model, train.batches(batch, generator, drop_last=True), augment, optimizer, scheduler,
                              generator)
    synchronise(device)
    epoch_seconds = time.perf_counter() - started
    images = len(train) - len(train) % batch
    return images / epoch_seconds, images / (epoch_seconds + load_seconds), images if metrics else 0


def baseline(folder: Path, device: torch.device, batch: int) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=max(1, (os.cpu_count() or 2) - 1),
                                         pin_memory=device.type == "cuda", persistent_workers=False)
    model = build_model("alexnet-cifar", 10, norm="batch").to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
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
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="model-only steps per figure")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch_size or (512 if device.type == "cuda" else 128)
    steps = args.steps or (50 if device.type == "cuda" else 10)
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
        steady, first, images = pipeline(dataset, device, batch)
        rows.append((f"pipeline, steady epoch ({images:,} images)", steady, steady / model_rate, ">= 0.85 of model-only"))
        rows.append(("pipeline, first epoch incl. decoding", first, first / model_rate, ""))
        base = baseline(scratch / "home" / "subset" / "train", device, batch)
        rows.append(("baseline ImageFolder + DataLoader", base, base / model_rate,
                     f"pipeline {steady / base:.2f}x baseline (GPU >= 5x, CPU >= 1x)"))
        lrn = model_only(build_model("alexnet-cifar", 10, norm="lrn"), device, batch, 32, steps)
        rows.append(("model-only norm=lrn, ours", lrn, lrn / model_rate, ">= 0.70 of norm=batch"))
        torch_lrn = model_only(with_torch_lrn(build_model("alexnet-cifar", 10, norm="lrn")), device, batch, 32, steps)
        rows.append(("model-only norm=lrn, torch.nn.LRN", torch_lrn, torch_lrn / model_rate, ""))
        if device.type == "cuda":
            alexnet = model_only(build_model("alexnet", 10), device, batch // 2, 224, steps)
            rows.append(("model-only alexnet 224, norm=lrn", alexnet, alexnet / model_rate, ""))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\nTraining benchmark on {name}, batch {batch}, torch {torch.__version__}\n")
    print(f"| {'figure':<42} | {'images/s':>10} | {'x model-only':>12} | target")
    print(f"|{'-' * 44}|{'-' * 12}|{'-' * 14}|-------")
    for label, rate, ratio, target in rows:
        print(f"| {label:<42} | {rate:>10,.0f} | {ratio:>12.2f} | {target}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "batch": batch, "torch": torch.__version__, "baseline": "model-only alexnet-cifar",
            "rows": [{"figure": label, "images_per_second": rate, "ratio": ratio, "target": target}
                     for label, rate, ratio, target in rows]}, indent=2))


if __name__ == "__main__":
    main()
