"""Out-of-sample probabilities for every image of a dataset, by K-fold training, and one model's
embeddings of them all: what confident learning and the twin check of an audit need.

    from cnn.config import TrainConfig
    from cnn.crossval import out_of_sample
    found = out_of_sample(TrainConfig(dataset_dir=".cnnpipe/datasets/digits", epochs=5), folds=2)
    found.probabilities   # (images, classes): each train image by the model that did not see it

The train images are dealt into `folds` folds, class by class in hash order, so every fold has
each class's share. Fold k trains, with the run's recipe, on the other folds (validating on the
val split) and predicts fold k. Val and test images are out of sample for every fold: they get
the mean of the fold models' probabilities. Each fold trains on a folder that holds only its
rows, in the store's layout, under `work_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cnn.config import TrainConfig
from cnn.decoding import decode_images
from cnn.device import resolve_device
from cnn.layout import FORMAT, MANIFEST, PublishedDataset
from cnn.predict import Predictor
from cnn.train import FitResult, fit

HELD_OUT = "test"  # what a fold's folder calls the fold it predicts, so that `fit` reports its top-1 too
_DECODE_BATCH = 512


@dataclass
class OutOfSample:
    sha256: list[str]
    split: list[str]
    labels: np.ndarray  # index into `classes` of each image's given label
    probabilities: np.ndarray  # (images, classes), each from models that did not train on the image
    classes: list[str]
    # Fold 0's model's embeddings of every image (None for a model without them, `cnn.embeddings`).
    embeddings: np.ndarray | None
    fold_top1: list[float]  # each fold model's top-1 on the fold it predicted


def deal_folds(sha256: list[str], labels: list[str], folds: int) -> np.ndarray:
    """The fold of each image: class by class, in hash order, round robin."""
    assigned = np.empty(len(sha256), dtype=np.int64)
    order = sorted(range(len(sha256)), key=lambda i: (labels[i], sha256[i]))
    position: dict[str, int] = {}
    for i in order:
        assigned[i] = position.get(labels[i], 0) % folds
        position[labels[i]] = position.get(labels[i], 0) + 1
    return assigned


def out_of_sample(config: TrainConfig, folds: int = 2, work_dir: str | Path | None = None,
                  on_fold: Callable[[int, FitResult], None] | None = None) -> OutOfSample:
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, not {folds}")
    dataset = PublishedDataset.open(config.dataset_dir)
    rows = _read(dataset, ["sha256", "label", "split"])
    train = np.asarray(pc.equal(rows["split"], "train"))
    sha256, labels, splits = (rows[name].to_pylist() for name in ("sha256", "label", "split"))
    fold = np.full(len(sha256), -1)
    fold[train] = deal_folds([sha256[i] for i in np.flatnonzero(train)],
                             [labels[i] for i in np.flatnonzero(train)], folds)
    classes = dataset.classes
    probabilities = np.zeros((len(sha256), len(classes)), dtype=np.float64)
    work = Path(work_dir or Path(config.dataset_dir).parent / ".crossval")
    fold_top1, embeddings = [], None
    for k in range(folds):
        fold_dir = _write_fold(dataset, fold, k, folds, work / f"{dataset.name}-fold{k}")
        result = fit(replace(config, dataset_dir=str(fold_dir), checkpoint_root=str(work / "checkpoints"),
                             resume=False))
        fold_top1.append(float(result.held_out["top1"]))
        if on_fold is not None:
            on_fold(k, result)
        predictor = Predictor(result.checkpoint, resolve_device(config.device))
        if predictor.classes != classes:
            raise ValueError(f"fold {k} trained on classes {predictor.classes}, the dataset has {classes}")
        predicted = (fold == k) | ~train  # its own fold, and the images no fold trains on
        share = np.where(train, 1.0, 1.0 / folds)
        wanted = np.flatnonzero(predicted) if k else np.arange(len(sha256))  # fold 0 embeds every image
        outputs, fold_embeddings = _predict(predictor, dataset, [sha256[i] for i in wanted])
        for position, i in enumerate(wanted):
            if predicted[i]:
                probabilities[i] += share[i] * outputs[position]
        if k == 0:
            embeddings = fold_embeddings
    label_index = {label: i for i, label in enumerate(classes)}
    return OutOfSample(sha256, splits, np.array([label_index[label] for label in labels]), probabilities, classes,
                       embeddings, fold_top1)


def _read(dataset: PublishedDataset, columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(path, columns=columns) for path in dataset.files]) if dataset.files \
        else pa.table({name: pa.array([], pa.string()) for name in columns})


def _write_fold(dataset: PublishedDataset, fold: np.ndarray, k: int, folds: int, target: Path) -> Path:
    """A dataset folder whose train split is every fold but k, with the dataset's val split, and
    fold k as its held-out split; the dataset's own test split is left out."""
    (target / "v000001").mkdir(parents=True, exist_ok=True)
    files, counts, start = [], {}, 0
    for index, path in enumerate(dataset.files):
        table = pq.read_table(path)
        mine = fold[start:start + len(table)]
        start += len(table)
        split = np.asarray(table["split"].to_pylist(), dtype=object)
        new_split = np.where(mine == k, HELD_OUT, np.where(split == "train", "train", split))
        keep = split != "test"
        table = table.set_column(table.column_names.index("split"), "split", pa.array(new_split, pa.string()))
        table = table.filter(pa.array(keep))
        part = f"v000001/part-{index:05d}.parquet"
        pq.write_table(table, target / part)
        files.append({"path": part, "rows": len(table), "version": 1})
        for split_name, label in zip(table["split"].to_pylist(), table["label"].to_pylist()):
            counts.setdefault(split_name, {}).setdefault(label, 0)
            counts[split_name][label] += 1
    manifest = {"format": FORMAT, "name": dataset.name, "version": 1,
                "version_id": f"{dataset.version_id}-fold{k}of{folds}", "classes": dataset.classes,
                "counts": counts, "num_rows": sum(f["rows"] for f in files), "files": files, "versions": []}
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def _predict(predictor: Predictor, dataset: PublishedDataset, wanted: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and embeddings of the images `wanted` (by sha256), in that order."""
    position = {sha: i for i, sha in enumerate(wanted)}
    probabilities = np.zeros((len(wanted), len(predictor.classes)), dtype=np.float64)
    embeddings = np.zeros((len(wanted), predictor.projection.components.shape[1]), dtype=np.float32) \
        if predictor.projection is not None else None
    for path in dataset.files:
        table = pq.read_table(path, columns=["sha256", "image"])
        keep = [i for i, sha in enumerate(table["sha256"].to_pylist()) if sha in position]
        images = table["image"].take(pa.array(keep, pa.int64())).to_pylist()
        targets = [position[table["sha256"][i].as_py()] for i in keep]
        for begin in range(0, len(images), _DECODE_BATCH):
            batch = decode_images(images[begin:begin + _DECODE_BATCH], predictor.decode_size, fit=predictor.resize)
            outputs, embedded = predictor.outputs(batch)
            rows = targets[begin:begin + _DECODE_BATCH]
            probabilities[rows] = outputs.numpy()
            if embeddings is not None:
                embeddings[rows] = embedded.numpy()
    return probabilities, embeddings
