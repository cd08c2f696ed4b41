"""Time to accuracy: CIFAR-10 trained by `cnn.train.fit` with the default automatic recipe, over several seeds.

    python bench/time_to_accuracy.py --device cuda                      # all of CIFAR-10, 3 seeds (bench/gpu.sh)
    python bench/time_to_accuracy.py --device cpu --train-per-class 20 --test-per-class 10 --seeds 1 --epochs 1

CIFAR-10 is read from ../shared/data/cifar10-jpeg.tar.gz (or $CNNPIPE_SHARED) as a stream and
ingested once into a temporary CNNPIPE home (ingest carves 10% of train/ out as validation).
Each seed is then one `fit` with only device, seed and checkpoint root set (and --epochs when
given), so batch size, learning rate, epochs and regularisation are the recipe's. Reported:
test top-1 and wall seconds from `fit` called to `fit` returned (decoding the split, training,
evaluation and checkpoints included), each seed and their mean ± sample standard deviation.

Target on a GPU: >= 88% test top-1 in <= 30 s. Both are absolute: no baseline is run here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.recipe import CIFAR, ingest, read_cifar, write_cifar_folder  # noqa: E402
from cnn.config import TrainConfig  # noqa: E402
from cnn.train import fit, plan  # noqa: E402

TARGET_TOP1 = 0.88
TARGET_SECONDS = 30.0
CIFAR_TRAIN_PER_CLASS = 5_000
CIFAR_TEST_PER_CLASS = 1_000


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=3, help="runs, seeded 0, 1, ...")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (smoke checks only)")
    parser.add_argument("--train-per-class", type=int, default=CIFAR_TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=CIFAR_TEST_PER_CLASS)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if not CIFAR.exists():
        raise SystemExit(f"{CIFAR} is missing: this benchmark needs ../shared beside the checkout")

    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-tta-") as scratch:
        scratch = Path(scratch)
        # Nothing this run does may write into the checkout's CNNPIPE home.
        os.environ["CNNPIPE_HOME"] = str(scratch / "home")
        started = time.perf_counter()
        cifar = read_cifar(args.train_per_class, args.test_per_class)
        write_cifar_folder(scratch / "source", cifar, args.train_per_class, "cifar10")
        del cifar
        dataset = ingest("cifar10", [scratch / "source"], scratch / "home")
        ingest_seconds = time.perf_counter() - started
        planned = plan(TrainConfig(dataset_dir=str(dataset), epochs=args.epochs, device=args.device))
        print(f"ingested in {ingest_seconds:.1f} s; {planned.recipe.line()}", flush=True)
        runs = []
        for seed in range(args.seeds):
            config = TrainConfig(dataset_dir=str(dataset), epochs=args.epochs, device=args.device, seed=seed,
                                 checkpoint_root=str(scratch / "checkpoints"), keep_checkpoints=1)
            fit_started = time.perf_counter()
            result = fit(config)
            seconds = time.perf_counter() - fit_started
            runs.append({"seed": seed, "top1": result.held_out["top1"], "seconds": seconds,
                         "epochs": result.epochs_run, "held_out_split": result.held_out_split})
            print(f"seed {seed}: {result.held_out_split} top-1 {100 * result.held_out['top1']:.2f}% "
                  f"after {result.epochs_run} epochs in {seconds:.1f} s", flush=True)

    top1_mean, top1_std = mean_and_spread([run["top1"] for run in runs])
    seconds_mean, seconds_std = mean_and_spread([run["seconds"] for run in runs])
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\nTime to accuracy on {name}, {planned.recipe.train_images:,} train images, "
          f"{len(runs)} seed(s), torch {torch.__version__}\n")
    print(f"| {'run':<12} | {'test top-1':>16} | {'fit wall s':>14} | target")
    print(f"|{'-' * 14}|{'-' * 18}|{'-' * 16}|-------")
    for run in runs:
        print(f"| {'seed ' + str(run['seed']):<12} | {100 * run['top1']:>15.2f}% | {run['seconds']:>14.1f} |")
    print(f"| {'mean ± std':<12} | {f'{100 * top1_mean:.2f} ± {100 * top1_std:.2f}%':>16} | "
          f"{f'{seconds_mean:.1f} ± {seconds_std:.1f}':>14} | "
          f">= {100 * TARGET_TOP1:.0f}% in <= {TARGET_SECONDS:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "torch": torch.__version__, "train_images": planned.recipe.train_images,
            "recipe": planned.recipe.line(), "ingest_seconds": ingest_seconds, "runs": runs,
            "top1_mean": top1_mean, "top1_std": top1_std, "seconds_mean": seconds_mean, "seconds_std": seconds_std,
            "target_top1": TARGET_TOP1, "target_seconds": TARGET_SECONDS,
        }, indent=2))


if __name__ == "__main__":
    main()
