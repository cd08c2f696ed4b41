"""Embedding drift beside the other drift figures: how often each alerts on batches like the
reference's and on batches shifted in class, blur, light, noise, colour or texture.

    python bench/embedding_drift.py [--checkpoint RUN/epoch-NNNN.pt] [--resamples 20] [--batch 1000]

An alexnet-cifar trained on the demo's rendered shapes with the automatic recipe (15 epochs, as
tests/cnnpipe/test_drift.py trains it; or `--checkpoint`, a run's checkpoint with its
`embedding.pt` beside it). Each kind of batch is `--resamples` seeded draws of `--batch` images
(with replacement) from a pool of freshly rendered shapes, shifted as named, inserted as classify
runs into a real predictions database and read back from `drift_by_run`, against a reference of
2,000 held-out shapes and one of 80 (the size of the shapes' own test split). Columns are the
share of runs on which each figure passes its limit, and the embedding shift's range.

Targets: like batches alert on at most 5% of runs; each shifted kind on at least 95%, grey
shapes (which every other figure passes) on embedding_shift alone. Inverted and colour-swapped
shapes are shapes the model was trained on: the demo draws background and shape colours
uniformly, so neither changes what the images look like as a whole.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnn import monitoring  # noqa: E402
from cnn.decoding import decode_images  # noqa: E402
from cnn.predict import Predictor  # noqa: E402
from cnnpipe.demo import SHAPES, encode, render_shape  # noqa: E402
from cnnpipe.predictions.classify import PART_SCHEMA  # noqa: E402
from cnnpipe.predictions.database import connect_for_writing, transaction  # noqa: E402
from cnnpipe.predictions.records import add_predictions, record_reference_profile  # noqa: E402
from cnnpipe.predictions.summary import DEFAULT_THRESHOLDS  # noqa: E402

SHIFTS = {
    "blurred": lambda image, rng: image.filter(ImageFilter.GaussianBlur(3)),
    "darkened": lambda image, rng: Image.fromarray((np.asarray(image) * 0.35).astype(np.uint8)),
    "noisy": lambda image, rng: Image.fromarray(
        np.clip(np.asarray(image) + rng.normal(0, 90, np.asarray(image).shape), 0, 255).astype(np.uint8)),
    "grey": lambda image, rng: image.convert("L").convert("RGB"),
    "low-contrast": lambda image, rng: Image.blend(image, Image.new("RGB", image.size, (128, 128, 128)), 0.5),
    "median-filtered": lambda image, rng: image.filter(ImageFilter.MedianFilter(3)),
    "sharpened": lambda image, rng: image.filter(ImageFilter.SHARPEN),
    "posterized": lambda image, rng: ImageOps.posterize(image, 2),
    "inverted": lambda image, rng: ImageOps.invert(image),
    "colour-swapped": lambda image, rng: Image.merge("RGB", image.split()[::-1]),
}
LIKE = ("like", "inverted", "colour-swapped")  # batches that should stay quiet
THRESHOLDS = {metric: threshold for metric, (threshold, _) in DEFAULT_THRESHOLDS.items()}
FIGURES = {"psi": "psi > psi_limit", "confidence": f"-confidence_shift > {THRESHOLDS['confidence_drop']}",
           "low conf.": f"low_confidence_shift > {THRESHOLDS['low_confidence_rise']}",
           "brightness": f"abs(brightness_shift) > {THRESHOLDS['brightness_shift']}",
           "embedding": "embedding_shift > embedding_shift_limit", "any": "alert"}


def trained_checkpoint(root: Path) -> Path:
    """alexnet-cifar trained on the demo's shapes, as the drift tests train it."""
    from cnn.config import TrainConfig
    from cnn.train import fit
    from cnnpipe.demo import write_demo_images
    from cnnpipe.settings import Settings
    from cnnpipe.sources import open_source
    from cnnpipe.store import DatasetStore, IngestOptions

    store = DatasetStore("shapes", Settings(home=root, mlflow_tracking_uri=""))
    for source in write_demo_images(root / "demo"):
        with store.lock():
            store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))
    result = fit(TrainConfig(dataset_dir=str(root / "datasets" / "shapes"), device="cpu", epochs=15,
                             checkpoint_root=str(root / "checkpoints")))
    return Path(result.checkpoint)


def pool(predictor: Predictor, count: int, seed: int, shift=None) -> dict[str, np.ndarray]:
    """Predictions, brightness and embeddings of `count` new shapes (JPEG and PNG), shifted or not."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(SHAPES), count)
    blobs = []
    for index, shape in enumerate(truth):
        image = render_shape(SHAPES[shape], rng)
        blobs.append(encode(shift(image, rng) if shift else image, "JPEG" if index % 2 else "PNG"))
    images = decode_images(blobs, 32)
    values, indices, calibrated, brightness, embeddings = predictor.top_k(images, 1).result()
    return {"truth": np.array([predictor.classes.index(SHAPES[t]) for t in truth]), "images": images,
            "label": np.array([predictor.classes[row[0]] for row in indices]), "confidence": np.array(values)[:, 0],
            "calibrated": np.array(calibrated), "brightness": np.array(brightness),
            "embedding": np.array(embeddings, dtype=np.float32)}


def profile(predictor: Predictor, rows: dict[str, np.ndarray], temperature: float) -> dict:
    count = len(rows["truth"])
    found = monitoring.reference_profile(predictor.probabilities(rows["images"]), torch.from_numpy(rows["truth"]),
                                         predictor.classes, temperature, [32] * count, [32] * count,
                                         monitoring.brightness(rows["images"]))
    return found | {"embedding": monitoring.embedding_reference(torch.from_numpy(rows["embedding"]))}


def insert_runs(database: Path, predictor: Predictor, runs: dict[str, dict[str, np.ndarray]]) -> None:
    """Classify runs (id: their rows), in one transaction: the views see them as if each ran alone."""
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    columns: dict[str, list] = {name: [] for name in PART_SCHEMA.names}
    for run_id, rows in runs.items():
        count = len(rows["label"])
        for name, values in (
                ("image_sha256", [f"{run_id}-{i}" for i in range(count)]), ("source_uri", ["inbox"] * count),
                ("member_path", [f"{i}.png" for i in range(count)]), ("model_name", [predictor.name] * count),
                ("model_version", [predictor.version] * count), ("mlflow_run_id", [None] * count),
                ("label", rows["label"].tolist()), ("confidence", rows["confidence"].tolist()),
                ("top5", [[{"label": label, "probability": p}] for label, p in zip(rows["label"], rows["confidence"])]),
                ("width", [32] * count), ("height", [32] * count), ("classify_run_id", [run_id] * count),
                ("predicted_at", [now] * count), ("calibrated_confidence", rows["calibrated"].tolist()),
                ("brightness", rows["brightness"].tolist()), ("embedding", list(rows["embedding"]))):
            columns[name] += values
    with transaction(database) as connection:
        connection.register("made", pa.table(columns, schema=PART_SCHEMA))
        add_predictions(connection, "SELECT * FROM made")
        connection.executemany("INSERT INTO classify_runs (classify_run_id, model_name, model_version, finished_at, "
                               "classified, rejected) VALUES (?, ?, ?, ?, ?, 0)",
                               [[run_id, predictor.name, predictor.version, now, len(rows["label"])]
                                for run_id, rows in runs.items()])


def table(database: Path, title: str) -> None:
    with connect_for_writing(database) as connection:
        found = connection.execute(
            f"SELECT split_part(classify_run_id, '/', 1) AS kind, "
            f"{', '.join(f'avg(CAST(coalesce({condition}, false) AS DOUBLE))' for condition in FIGURES.values())}, "
            "min(embedding_shift), max(embedding_shift), any_value(embedding_shift_limit) "
            "FROM drift_by_run GROUP BY ALL").fetchall()
    order = ["like", "prior", *SHIFTS]
    found.sort(key=lambda row: order.index(row[0]))
    print(f"\n{title}\n")
    print(f"| {'batch':<16} | " + " | ".join(f"{name:>10}" for name in FIGURES) + " | embedding_shift | limit  |")
    print(f"|{'-' * 18}|" + "|".join("-" * 12 for _ in FIGURES) + f"|{'-' * 17}|{'-' * 8}|")
    for kind, *rates, low, high, limit in found:
        print(f"| {kind:<16} | " + " | ".join(f"{rate:>10.0%}" for rate in rates)
              + f" | {low:>6.3f} - {high:<6.3f} | {limit:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.environ["CNNPIPE_HOME"] = str(scratch / "home")
        checkpoint = args.checkpoint or trained_checkpoint(scratch / "train")
        predictor = Predictor(checkpoint, batch_size=256)
        if predictor.projection is None:
            raise SystemExit(f"{checkpoint}: no embedding.pt beside it; train with this version of cnn.train")
        held_out = pool(predictor, 2000, seed=6)
        temperature = monitoring.fit_temperature(predictor.probabilities(held_out["images"]),
                                                 torch.from_numpy(held_out["truth"]))
        predictor.temperature = temperature
        rng = np.random.default_rng(0)

        def resample(rows: dict, favoured: int | None = None) -> dict:
            picked = rng.integers(0, len(rows["label"]), args.batch)
            if favoured is not None:  # a third of the batch from one true class
                third = args.batch // 3
                picked[:third] = rng.choice(np.flatnonzero(rows["truth"] == favoured), third)
            return {key: values[picked] for key, values in rows.items() if key != "images"}

        like = pool(predictor, 2000, seed=1)
        runs = {f"like/{i:02d}": resample(like) for i in range(args.resamples)}
        runs |= {f"prior/{i:02d}": resample(like, favoured=i % len(SHAPES)) for i in range(args.resamples)}
        for name, shift in SHIFTS.items():
            shifted = pool(predictor, 1000, seed=2, shift=shift)
            runs |= {f"{name}/{i:02d}": resample(shifted) for i in range(args.resamples)}
        database = scratch / "home" / "predictions.duckdb"
        insert_runs(database, predictor, runs)
        print(f"{checkpoint}: {args.resamples} batches of {args.batch:,} images of each kind, seeded; "
              f"quiet: {', '.join(LIKE)}")
        for size, seed in ((2000, 6), (80, 7)):
            reference = held_out if size == 2000 else pool(predictor, size, seed=seed)
            record_reference_profile(database, predictor.name, predictor.version, "bench",
                                     profile(predictor, reference, temperature))
            table(database, f"Share of runs alerting, against a reference of {size:,} held-out shapes")


if __name__ == "__main__":
    main()
