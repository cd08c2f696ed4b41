"""Monitoring at scale: the drift and accuracy views over 10 M predictions, and what the monitor
task adds to a classify run of 10,000 images.

    python bench/monitor.py [--rows 10000000] [--images 10000]

1. The views: bench/views.py's synthetic 10 M-row database (two versions, 3,000 classify runs
   each, reference profiles, labels for half of the images), queried through `cnnpipe sql`'s
   hardened read-only connection, against one full scan of `predictions` as the baseline.
2. The monitor task: `classify_source` of `--images` CIFAR-10 test JPEGs (rendered shapes when
   ../shared is absent) with an untrained alexnet-cifar, then the monitor task's own work for
   that run (`run_drift`: its `drift_by_run` row and distributions; the PNG; the Markdown): once in a
   fresh database, once in one that already holds the 10 M rows. The Prefect API calls that
   publish the artifact and the event are left out: a few milliseconds on a running server.

Targets: each monitoring view < 1 s; the monitor task < 5% of the classify run.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from classify import CIFAR, make_checkpoint  # noqa: E402
from views import QUERIES, build, timed  # noqa: E402

from cnn import monitoring  # noqa: E402
from cnn.decoding import decode_images  # noqa: E402
from cnn.predict import Predictor  # noqa: E402
from cnnpipe.demo import SHAPES, encode, render_shape  # noqa: E402
from cnnpipe.monitoring.drift import run_drift  # noqa: E402
from cnnpipe.monitoring.drift_picture import drift_distributions  # noqa: E402
from cnnpipe.predictions.classify import classify_source  # noqa: E402
from cnnpipe.predictions.records import record_reference_profile  # noqa: E402
from cnnpipe.reports.markdown import drift_markdown  # noqa: E402
from cnnpipe.sources import open_source  # noqa: E402

BASELINE = "baseline: full scan count + avg"
VIEWS = (BASELINE, "drift_by_run, every run", "drift_daily, last 7 days", "production_accuracy")


def images_tar(path: Path, count: int) -> Path:
    """`count` CIFAR-10 test JPEGs, or rendered shapes when ../shared is absent, as one tar."""
    with tarfile.open(path, "w") as target:
        if CIFAR.exists():
            with tarfile.open(CIFAR) as source:
                for member in source:
                    if member.name.startswith("test/") and member.isfile():
                        target.addfile(member, source.extractfile(member))
                        count -= 1
                        if not count:
                            break
        else:
            rng = np.random.default_rng(0)
            for index in range(count):
                data = encode(render_shape(SHAPES[index % len(SHAPES)], rng), "JPEG")
                member = tarfile.TarInfo(f"images/{index:06d}.jpg")
                member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    return path


def reference_for(predictor: Predictor, tar: Path, database: Path) -> None:
    """A reference profile for the untrained model, from 1,000 of the images, as `fit` keeps one."""
    blobs = []
    with tarfile.open(tar) as source:
        for member in source:
            blobs.append(source.extractfile(member).read())
            if len(blobs) == 1000:
                break
    images = decode_images(blobs, 32)
    probabilities = predictor.probabilities(images)
    targets = torch.randint(0, len(predictor.classes), (len(blobs),))
    profile = monitoring.reference_profile(probabilities, targets, predictor.classes, 1.0, [32] * len(blobs),
                                           [32] * len(blobs), monitoring.brightness(images))
    record_reference_profile(database, predictor.name, predictor.version, "bench", profile)


def monitor_work(database: Path, run_id: str, pictures: Path) -> float:
    """The monitor task's body for one run, without its Prefect API calls; seconds."""
    started = time.perf_counter()
    drift = run_drift(database, run_id)
    assert drift is not None, "the run has no reference profile"
    picture = drift_distributions(drift["distributions"], "bench", pictures / f"{run_id}.png")
    drift_markdown(drift, picture)
    return time.perf_counter() - started


def classify_then_monitor(predictor: Predictor, tar: Path, database: Path, scratch: Path, run_id: str) -> tuple:
    reference_for(predictor, tar, database)
    summary = classify_source(open_source(str(tar)), predictor, database, scratch / "staging", run_id)
    return summary.classified, summary.seconds, monitor_work(database, run_id, scratch / "pictures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        large = scratch / "large.duckdb"
        started = time.perf_counter()
        build(large, args.rows)
        print(f"built {args.rows:,} rows in {time.perf_counter() - started:.1f} s")
        seconds = {name: timed(QUERIES[name], large) for name in VIEWS}

        predictor = Predictor(make_checkpoint(scratch / "model.pt"), "cpu", 256)
        tar = images_tar(scratch / "images.tar", args.images)
        fresh = classify_then_monitor(predictor, tar, scratch / "fresh.duckdb", scratch, "fresh")
        shutil.rmtree(scratch / "staging", ignore_errors=True)
        loaded = classify_then_monitor(predictor, tar, large, scratch, "loaded")

    base = seconds[BASELINE]
    print(f"\nMonitoring views over {args.rows:,} predictions, CPU, {os.cpu_count()} cores (best of 3)\n")
    print(f"| {'query':<36} | {'seconds':>8} | {'x full scan':>11} | target")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 13}|-------")
    for name, value in seconds.items():
        print(f"| {name:<36} | {value:>8.3f} | {value / base:>11.2f} | {'' if name == BASELINE else '< 1 s'}")
    print(f"\nThe monitor task after a classify run, CPU, {os.cpu_count()} cores\n")
    print(f"| {'database':<32} | {'images':>7} | {'classify s':>10} | {'monitor s':>9} | {'share':>6} | target")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 12}|{'-' * 11}|{'-' * 8}|-------")
    for label, (images, classify_seconds, monitor_seconds) in (("fresh", fresh),
                                                               (f"holding {args.rows:,} rows", loaded)):
        print(f"| {label:<32} | {images:>7,} | {classify_seconds:>10.2f} | {monitor_seconds:>9.3f} | "
              f"{monitor_seconds / classify_seconds:>6.1%} | < 5%")


if __name__ == "__main__":
    main()
