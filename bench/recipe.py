"""The automatic recipe against a small grid of batch size x learning rate, on several datasets.

    python bench/recipe.py                          # the default run, 15 to 18 minutes on 2 cores
    python bench/recipe.py --quick                  # a smoke check: tiny sets, 1 epoch, a 1x2 grid
    python bench/recipe.py --datasets cifar-1k,shapes --epochs 5 --grid-lr 0.01,0.05,0.2
    python bench/recipe.py --large --device cuda    # cifar-10k as well

What is measured: for each dataset, test top-1 of alexnet-cifar trained by
`cnn.train.fit` with the automatic recipe (only epochs, device, seed and checkpoint_root
set: batch size, learning rate, dropout, weight decay, label smoothing and the input size
all chosen by `cnn.recipe`; the "input px" column says which size), and test top-1 of every
cell of a grid of batch size x learning rate (those two set, and the input size and resize
mode set to the auto run's, so that the grid compares batch x lr at equal input; everything
else still automatic), all at the same number of epochs and the same seed. The baseline is
the grid's best cell, measured in the same run. For photos only, one more run, the "32 px"
column: the auto recipe at image_size 32 with resize crop, the input every dataset got
before the recipe chose sizes, which shows what photo-size input buys.

Datasets, built once per run into a temporary CNNPIPE home from
../shared/data/cifar10-jpeg.tar.gz (read as a stream, never extracted; the first N files
per class in sorted member order), each ingested as train/<class>/ (ingest carves the
validation split out of train) plus a fixed test/<class>/ of 100 per class from CIFAR's test/:
- cifar-1k: 100 per class;  cifar-3k: 300 per class;  cifar-10k: 1,000 per class (--large);
- gray-1k: cifar-1k as grayscale ("L") JPEGs, test set too (decoding makes them 3-channel);
- px64-1k, px96-1k: cifar-1k upscaled (bicubic) to 64 and 96 px, test set too; the recipe
  trains on them at 64 and 96 px, so these measure it at larger inputs that hold no more
  detail than 32 px;
- shapes: the demo's rendered shapes (cnnpipe.demo.write_demo_images, 800 images, 4 classes,
  train/val/test from hashes);
- photos: bench/photos.py's synthetic photos, 320x240 JPEGs of 10 classes (the class is a
  fine pattern inside an object a third of the frame tall), 100 train and 30 test a class,
  generated in the bench (about 5 s with ingestion). The recipe squashes them whole to the
  size it times as affordable: 224 px on this CPU.

Defaults and the time they take. This 2-core CPU (a Xeon with AMX) trains alexnet-cifar
at about 300 images/s at 32 px in bf16 autocast (the automatic precision there; about
80 images/s in fp32), so ~15 minutes is ~200,000 training image-passes in all
(evaluation, decoding, checkpoints and ingestion take the rest of the time). About 900
training images per 1k set (10% go to validation), ~2,700 for cifar-3k, ~640 for shapes.
The default grid is 2 x 2, batch {32, 128} x lr {0.01, 0.05}, chosen to bracket the
automatic choice (batch 32, lr 0.05 for a 1k set; batch 64, lr 0.0707 for cifar-3k):
from lr/batch well below the auto ratio (128, 0.01) to about equal (32, 0.05). With 5
runs a dataset and per-dataset epochs that give each CIFAR run about 5,400 to 8,100
image-passes (shapes, the easy set, ~5,100):
    1k sets (4):  900 x 5 runs x 6 epochs x 4 = 108,000
    cifar-3k:    2700 x 5 runs x 3 epochs     =  40,500
    shapes:       640 x 5 runs x 8 epochs     =  25,600
    total                                      174,100 image-passes = ~580 s at 300 images/s
    photos:       900 x 5 runs x 4 epochs     =  18,000 at 224 px = ~110 s at ~165 images/s
                  900 x 1 run  x 4 epochs     =   3,600 at 32 px  =  ~12 s
plus evaluation, checkpoints and ingestion: 12 to 15 minutes in all for the CIFAR sets and
shapes, and about 2.5 minutes more for photos (each 224-px run about 25 s with its decoding
and evaluation), so 15 to 18 minutes (about three times that on a CPU without AMX, which
trains in fp32; there the recipe may choose a smaller size for photos). Photos get fewer
epochs than the other sets because an image-pass at 224 px costs about twice one at 32 px.
The 1k sets at 64 and 96 px cost about what 32 px does (the stem's stride grows with the
size). --epochs N sets the same N for every dataset. cifar-10k (--large) trains 2 epochs:
9,000 x 5 x 2 = 90,000 more image-passes. At these epochs every auto run has 100 steps or
more (photos: 108), so none is warned as too short.
--quick: a tenth of the CIFAR images (10 a class, 30 for cifar-3k), 100 shapes, 10 photos
a class, 10 test images a class, 1 epoch, batch {32} x lr {0.01, 0.05}: a smoke check of
every path in about 1.5 minutes, not a measurement (everything is near chance).

Targets: on every dataset the auto run is within 3 points of the grid's best
(auto >= best - 3 points) and not at chance (auto >= 1.5 x 1/classes); the verdict column
says "ok" or "MISS". A MISS is a finding, not a failure: the exit status is 0 either way.
Note that the recipe's learning rate is chosen for its own epoch budget (at least 30 epochs
or 600 steps), not for the few epochs run here, which favours higher learning rates.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CIFAR = Path(os.environ.get("CNNPIPE_SHARED", REPO.parent / "shared")) / "data" / "cifar10-jpeg.tar.gz"

from cnn.config import TrainConfig  # noqa: E402
from cnn.device import resolve_device, uses_bf16  # noqa: E402
from cnn.train import fit, plan  # noqa: E402

DATASETS = ("cifar-1k", "cifar-3k", "cifar-10k", "gray-1k", "px64-1k", "px96-1k", "shapes", "photos")
DEFAULT_DATASETS = tuple(name for name in DATASETS if name != "cifar-10k")
# Training images per class taken from CIFAR's train/ (before the validation carve).
PER_CLASS = {"cifar-1k": 100, "cifar-3k": 300, "cifar-10k": 1000, "gray-1k": 100, "px64-1k": 100, "px96-1k": 100}
TEST_PER_CLASS = 100
# photos: bench/photos.py's synthetic set, small enough for its runs at photo-size input to fit
# the time accounting above; QUICK_DIVISOR applies to its train images too.
PHOTOS = {"classes": 10, "per_class": 100, "test_per_class": 30, "size": (320, 240)}
# About 5,000 to 8,000 training image-passes per run, photos 3,600 at 224 px (see the docstring's arithmetic).
DEFAULT_EPOCHS = {"cifar-1k": 6, "gray-1k": 6, "px64-1k": 6, "px96-1k": 6, "cifar-3k": 3, "cifar-10k": 2, "shapes": 8,
                  "photos": 4}
# --capped: what a user who caps the epochs for a quick try gets (issue 31).
CAPPED_EPOCHS = (3, 5)
DEFAULT_GRID_BATCH = (32, 128)
DEFAULT_GRID_LR = (0.01, 0.05)
# --quick: a tenth of the training images, 10 test images per class, 1 epoch, a 1 x 2 grid.
QUICK_DIVISOR = 10
QUICK_TEST_PER_CLASS = 10
QUICK_GRID_BATCH = (32,)
QUICK_GRID_LR = (0.01, 0.05)
TOLERANCE_POINTS = 3.0
CHANCE_FACTOR = 1.5


@dataclass
class Run:
    label: str
    batch_size: int
    lr: float
    top1: float | None
    seconds: float
    note: str = ""


@dataclass
class Outcome:
    dataset: str
    train_images: int
    classes: int
    epochs: int
    ingest_seconds: float
    recipe_line: str = ""
    auto: Run | None = None
    grid: list[Run] = field(default_factory=list)
    # The auto run's input size, which the grid keeps; and, for photos, the auto recipe at 32 px
    # (centre crop, as before the recipe chose sizes): what photo-size input buys.
    image_size: int | None = None
    at_32px: Run | None = None

    @property
    def best(self) -> Run | None:
        finished = [run for run in self.grid if run.top1 is not None]
        return max(finished, key=lambda run: run.top1) if finished else None

    @property
    def chance(self) -> float:
        return 1.0 / self.classes

    def verdict(self) -> str:
        best = self.best
        if self.auto is None or self.auto.top1 is None or best is None:
            return "n/a"
        near = self.auto.top1 >= best.top1 - TOLERANCE_POINTS / 100
        return "ok" if near and self.auto.top1 >= CHANCE_FACTOR * self.chance else "MISS"


# ---- datasets -------------------------------------------------------------------------


def read_cifar(train_per_class: int, test_per_class: int) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    """{split: {class: [(file name, bytes)]}}: the first files per class in sorted member
    order, read from the tarball as a stream and holding at most twice that many at a time."""
    wanted = {"train": train_per_class, "test": test_per_class}
    kept: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    with tarfile.open(CIFAR, "r|*") as tar:
        for member in tar:
            tar.members.clear()
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in wanted or not wanted[parts[0]]:
                continue
            split, label, name = parts
            files = kept[split].setdefault(label, [])
            files.append((name, tar.extractfile(member).read()))
            if len(files) >= 2 * wanted[split]:
                files.sort()
                del files[wanted[split]:]
    for split, classes in kept.items():
        for label, files in classes.items():
            files.sort()
            del files[wanted[split]:]
    return kept


def reencode(data: bytes, mode: str | None = None, size: int | None = None) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert(mode or "RGB")
        if size:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def write_cifar_folder(folder: Path, cifar: dict, per_class: int, name: str) -> None:
    """train/<class>/ and test/<class>/ for one CIFAR-derived dataset."""
    transform = {"gray-1k": {"mode": "L"}, "px64-1k": {"size": 64}, "px96-1k": {"size": 96}}.get(name)
    for split, classes in cifar.items():
        for label, files in classes.items():
            target = folder / split / label
            target.mkdir(parents=True)
            for file_name, data in files[:per_class] if split == "train" else files:
                (target / file_name).write_bytes(reencode(data, **transform) if transform else data)


def ingest(name: str, sources: list[Path], home: Path) -> Path:
    from cnnpipe.settings import Settings
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions

    store = DatasetStore(name, Settings(home=home, mlflow_tracking_uri=""))
    for source in sources:
        with store.lock():
            store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))
    return Path(store.root)


def build_dataset(name: str, cifar: dict, scratch: Path, home: Path, quick: bool) -> Path:
    if name == "shapes":
        from cnnpipe.demo import write_demo_images

        sizes = {"per_class": 20, "archive_per_class": 5} if quick else {}
        return ingest(name, list(write_demo_images(scratch / "sources" / name, **sizes)), home)
    folder = scratch / "sources" / name
    if name == "photos":
        from bench.photos import write_photo_dataset

        write_photo_dataset(folder, PHOTOS["classes"], PHOTOS["per_class"] // (QUICK_DIVISOR if quick else 1),
                            QUICK_TEST_PER_CLASS if quick else PHOTOS["test_per_class"], PHOTOS["size"])
        dataset = ingest(name, [folder], home)
        shutil.rmtree(folder)
        return dataset
    per_class = PER_CLASS[name] // (QUICK_DIVISOR if quick else 1)
    write_cifar_folder(folder, cifar, per_class, name)
    dataset = ingest(name, [folder], home)
    shutil.rmtree(folder)
    return dataset


# ---- training -------------------------------------------------------------------------


def train(dataset: Path, checkpoints: Path, epochs: int, device: str, seed: int,
          batch_size: int | None = None, lr: float | None = None, image_size: int | None = None,
          resize: str | None = None) -> tuple[float, str]:
    """Test top-1 of one run, and the held-out split it was measured on."""
    config = TrainConfig(dataset_dir=str(dataset), epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                         seed=seed, checkpoint_root=str(checkpoints), keep_checkpoints=1, image_size=image_size,
                         resize=resize)
    result = fit(config)
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return result.held_out["top1"], result.held_out_split


def bench_dataset(name: str, dataset: Path, ingest_seconds: float, epochs: int, args, started: float,
                  checkpoints: Path) -> Outcome:
    from cnn.splits import StoreSplit

    train_split = StoreSplit.open(dataset, "train")
    outcome = Outcome(name, train_split.rows, len(train_split.classes), epochs, ingest_seconds)
    planned = plan(TrainConfig(dataset_dir=str(dataset), epochs=epochs, device=args.device, seed=args.seed))
    chosen = planned.recipe
    outcome.recipe_line = chosen.line()
    outcome.image_size = planned.config.image_size
    print(f"[{time.perf_counter() - started:6.0f} s] {name}: {outcome.train_images:,} train images, "
          f"{outcome.classes} classes, ingested in {ingest_seconds:.1f} s; {outcome.recipe_line}", flush=True)
    for warning in planned.warnings:
        print(f"           {name}: warning for the auto run: {warning}", flush=True)

    def one(label: str, batch_size: int, lr: float, given: bool, image_size: int | None,
            resize: str | None = None) -> Run:
        """One run; batch size and lr set when `given`, the input size and resize mode when not None."""
        run_started = time.perf_counter()
        size = image_size or outcome.image_size
        try:
            top1, split = train(dataset, checkpoints, epochs, args.device, args.seed,
                                batch_size if given else None, lr if given else None, image_size, resize)
        except ValueError as error:  # a batch larger than the train split
            run = Run(label, batch_size, lr, None, time.perf_counter() - run_started, f"skipped: {error}")
        else:
            note = "" if split == "test" else f"held out on {split}, not test"
            run = Run(label, batch_size, lr, top1, time.perf_counter() - run_started, note)
        figure = "n/a" if run.top1 is None else f"{100 * run.top1:5.1f}%"
        print(f"[{time.perf_counter() - started:6.0f} s] {name:<9} {label:<5} {size:>3} px, batch {batch_size:>4}, "
              f"lr {lr:<7g} x {epochs} epochs: test top-1 {figure} ({run.seconds:.0f} s) {run.note}".rstrip(),
              flush=True)
        return run

    # The auto run chooses its input size itself (the same as `planned`: the device's timings are
    # cached); the grid is given that size, so that it compares batch x lr at equal input.
    outcome.auto = one("auto", chosen.batch_size, chosen.lr, False, None)
    for batch_size in args.grid_batch:
        for lr in args.grid_lr:
            outcome.grid.append(one("grid", batch_size, lr, True, planned.config.image_size,
                                    planned.config.resize))
    if name == "photos":
        outcome.at_32px = one("32 px", chosen.batch_size, chosen.lr, False, 32, "crop")
    return outcome


# ---- report ---------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report(outcomes: list[Outcome], args, total_seconds: float) -> None:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    grid = f"batch {{{', '.join(map(str, args.grid_batch))}}} x lr {{{', '.join(f'{lr:g}' for lr in args.grid_lr)}}}"
    print(f"\nRecipe benchmark{' (--quick)' if args.quick else ''} on {where}: auto against the grid {grid}, "
          f"seed {args.seed}\n")
    header = ("dataset", "train images", "classes", "capped epochs", "input px", "auto recipe (batch, lr)", "auto top-1",
              "32 px", "grid best (batch, lr)", "grid best top-1", "auto − best (points)", "chance", "verdict")
    rows = []
    for outcome in outcomes:
        auto, best = outcome.auto, outcome.best
        gap = (f"{100 * (auto.top1 - best.top1):+.1f}" if auto and best and auto.top1 is not None else "n/a")
        rows.append((outcome.dataset, f"{outcome.train_images:,}", str(outcome.classes), str(outcome.epochs),
                     str(outcome.image_size), f"{auto.batch_size}, {auto.lr:g}" if auto else "n/a",
                     percent(auto.top1 if auto else None), percent(outcome.at_32px.top1) if outcome.at_32px else "",
                     f"{best.batch_size}, {best.lr:g}" if best else "n/a", percent(best.top1 if best else None),
                     gap, percent(outcome.chance), outcome.verdict()))
    print_table(header, rows)
    if any(outcome.at_32px for outcome in outcomes):
        print("32 px: the auto recipe with image_size 32 and resize crop, the input before the recipe chose sizes; "
              "the grid trains at the auto run's input px")

    print("\nEvery run, test top-1 (wall seconds):\n")
    cells = [(batch, lr) for batch in args.grid_batch for lr in args.grid_lr]
    header = ("dataset", "epochs", "input px", "auto", *(f"{batch}, {lr:g}" for batch, lr in cells), "32 px", "ingest s")
    rows = []
    for outcome in outcomes:
        runs = [outcome.auto, *outcome.grid]
        rows.append((outcome.dataset, str(outcome.epochs), str(outcome.image_size),
                     *(f"{percent(run.top1)} ({run.seconds:.0f})" for run in runs),
                     f"{percent(outcome.at_32px.top1)} ({outcome.at_32px.seconds:.0f})" if outcome.at_32px else "",
                     f"{outcome.ingest_seconds:.0f}"))
    print_table(header, rows)

    within = sum(outcome.verdict() == "ok" for outcome in outcomes)
    print(f"\nauto within {TOLERANCE_POINTS:g} points of the grid's best on {within} of {len(outcomes)} datasets "
          f"(and at least {CHANCE_FACTOR:g}x chance)")
    for outcome in outcomes:
        print(f"  {outcome.dataset}, {outcome.epochs} epochs: {outcome.recipe_line}")
    threads = torch.get_num_threads()
    precision = "bf16" if uses_bf16(resolve_device(args.device)) else "fp32"
    print(f"total wall time {total_seconds:.0f} s; {precision}; torch {torch.__version__}; {os.cpu_count()} CPUs, "
          f"{threads} torch threads; {platform.processor() or platform.machine()}; {' '.join(platform.uname())}")


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(text) for text in column) for column in zip(header, *rows)]
    print("| " + " | ".join(text.ljust(width) for text, width in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print("| " + " | ".join(text.ljust(width) for text, width in zip(row, widths)) + " |")


# ---- main -----------------------------------------------------------------------------


def parse_list(kind):
    def parse(text: str):
        return tuple(kind(item) for item in text.split(",") if item.strip())
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=parse_list(str), default=None,
                        help=f"comma-separated, of {', '.join(DATASETS)} (default: all but cifar-10k)")
    parser.add_argument("--large", action="store_true", help="add cifar-10k to the default datasets")
    parser.add_argument("--epochs", type=parse_list(int), default=None,
                        help="comma-separated epochs for every run, each a row of the table (default: per dataset, "
                             "see above; 1 with --quick)")
    parser.add_argument("--capped", action="store_true",
                        help=f"the capped-epochs table: --epochs {','.join(map(str, CAPPED_EPOCHS))}")
    parser.add_argument("--grid-batch", type=parse_list(int), default=None,
                        help="grid batch sizes (default 32,128; 32 with --quick)")
    parser.add_argument("--grid-lr", type=parse_list(float), default=None,
                        help="grid learning rates (default 0.01,0.05)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: a tenth of the images, 10 test images a class, 1 epoch, a 1x2 grid")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.datasets or (DEFAULT_DATASETS + (("cifar-10k",) if args.large else ()))
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        parser.error(f"--datasets: unknown {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    if args.capped:
        args.epochs = args.epochs or CAPPED_EPOCHS
    if args.epochs is not None and min(args.epochs) < 1:
        parser.error("--epochs must be at least 1")
    args.grid_batch = args.grid_batch or (QUICK_GRID_BATCH if args.quick else DEFAULT_GRID_BATCH)
    args.grid_lr = args.grid_lr or (QUICK_GRID_LR if args.quick else DEFAULT_GRID_LR)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    needs_cifar = [name for name in names if name not in ("shapes", "photos")]
    if needs_cifar and not CIFAR.exists():
        raise SystemExit(f"{CIFAR} is missing: this benchmark needs ../shared beside the checkout")

    started = time.perf_counter()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-recipe-", dir=os.environ.get("BENCH_TMP")) as scratch:
        scratch = Path(scratch)
        home = scratch / "home"
        # Nothing this run does may write into the checkout's CNNPIPE home.
        os.environ["CNNPIPE_HOME"] = str(home)
        cifar = {}
        if needs_cifar:
            divisor = QUICK_DIVISOR if args.quick else 1
            cifar = read_cifar(max(PER_CLASS[name] for name in needs_cifar) // divisor,
                               QUICK_TEST_PER_CLASS if args.quick else TEST_PER_CLASS)
            print(f"[{time.perf_counter() - started:6.0f} s] read {CIFAR.name}", flush=True)
        for name in names:
            ingest_started = time.perf_counter()
            dataset = build_dataset(name, cifar, scratch, home, args.quick)
            ingest_seconds = time.perf_counter() - ingest_started
            for epochs in args.epochs or (1 if args.quick else DEFAULT_EPOCHS[name],):
                outcomes.append(bench_dataset(name, dataset, ingest_seconds, epochs, args, started,
                                              scratch / "checkpoints"))
    report(outcomes, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
