"""A dataset's splits in the Parquet store, and which of them a run trains and validates on.

`StoreSplit` locates one split's rows without the store's code; `validation_split` picks the
split a run validates on; `require_trainable_split` and `validation_warning` say, before a
run starts, why its splits would not train or would flatter the held-out figure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cnn.layout import PublishedDataset


class UnreadablePart(Exception):
    """A Parquet part of the dataset that does not read: truncated, overwritten or missing."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class StoreSplit:
    """One split of a dataset in the Parquet store, located without the store's code."""

    files: tuple[Path, ...]
    split: str
    classes: tuple[str, ...]
    version_id: str
    rows: int
    stats_dir: Path | None = None  # where statistics derived from this version are kept

    @classmethod
    def open(cls, dataset_dir: str | Path, split: str, classes: Sequence[str] | None = None) -> StoreSplit:
        dataset = PublishedDataset.open(dataset_dir)
        return cls(dataset.files, split, tuple(classes or dataset.classes), dataset.version_id, dataset.rows(split),
                   dataset.stats_dir)

    def row_groups(self) -> list[tuple[Path, int]]:
        return [(path, group) for path in self.files for group in range(_opened(path).num_row_groups)]

    def group_rows(self) -> list[tuple[Path, int, int]]:
        """Every row group with its number of rows in this split, from the split column alone."""
        return [(path, group, len(self._rows(path, group, ["split"])["split"])) for path, group in self.row_groups()]

    def image_sizes(self) -> tuple[list[int], list[int]]:
        """The stored width and height of every image of this split."""
        widths, heights = [], []
        for path, group in self.row_groups():
            rows = self._rows(path, group, ["width", "height"])
            widths += rows["width"]
            heights += rows["height"]
        return widths, heights

    def read_group(self, path: Path, group: int) -> tuple[list[bytes], list[int]]:
        index = {label: i for i, label in enumerate(self.classes)}
        rows = self._rows(path, group, ["image", "label"])
        return rows["image"], [index[label] for label in rows["label"]]

    def _rows(self, path: Path, group: int, columns: list[str]) -> dict[str, list]:
        """`columns` of this split's rows in one row group, naming the part if it does not read."""
        try:
            table = _opened(path).read_row_group(group, columns=list(dict.fromkeys([*columns, "split"])))
        except (pa.ArrowException, OSError) as exc:
            raise UnreadablePart(path, f"row group {group} does not read: {_first_line(exc)}") from None
        keep = [i for i, split in enumerate(table.column("split").to_pylist()) if split == self.split]
        return {name: [values[i] for i in keep] for name in columns for values in [table.column(name).to_pylist()]}


def _opened(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadablePart(path, f"does not read: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


# Fewer train images of a class than this and a run has nothing to learn the class from: one or
# two a class trained to a nan loss or crashed in evaluation. Five is a floor against a wrong
# folder or a badly split source, not a recipe for accuracy (that takes hundreds a class), and
# keeps the small sets tests and first tries train on (a dozen a class) trainable.
MIN_TRAIN_IMAGES_PER_CLASS = 5
# A message names at most this many classes' counts, the ones below the floor first.
COUNTS_SHOWN = 10


def require_trainable_split(dataset_dir: str | os.PathLike) -> None:
    """Refuse, in one line naming the counts, a dataset a run could not learn from or report on:
    a train split of one class (the model would learn to answer it always, score 100% on a
    validation split of that class and be crowned champion), a class with fewer than
    MIN_TRAIN_IMAGES_PER_CLASS train images, or no validation or test images at all."""
    dataset = PublishedDataset.open(dataset_dir)
    name = Path(dataset_dir).name
    counts = dataset.counts("train")
    classes = sorted(label for label, images in counts.items() if images)
    if len(dataset.classes) < 2:
        found = f"only class {classes[0]!r}" if classes else "no images"
        raise ValueError(f"the train split of {name} has {found}: a classifier needs images of "
                         "at least two classes; ingest another class's images into it first")
    per_class = {label: counts.get(label, 0) for label in dataset.classes}
    short = [label for label, images in per_class.items() if images < MIN_TRAIN_IMAGES_PER_CLASS]
    if short:
        ranked = short + [label for label in per_class if label not in short]
        named = ", ".join(f"{label} {per_class[label]}" for label in ranked[:COUNTS_SHOWN])
        floor = f"at least {MIN_TRAIN_IMAGES_PER_CLASS} a class are needed"
        if len(ranked) > COUNTS_SHOWN:
            named += f" and {len(ranked) - COUNTS_SHOWN} more classes"
            floor += f"; {len(short)} of {len(ranked)} classes have fewer"
        raise ValueError(f"the train split of {name} has too few images to train on: {named} ({floor}); "
                         "ingest more images")
    if not dataset.rows("val") and not dataset.rows("test"):
        raise ValueError(f"{name} has no validation or test images, so a run would have nothing to validate on "
                         "or report: ingest more images (--val-fraction and --test-fraction of them are held out)")


def validation_split(dataset_dir: str | os.PathLike, classes: list[str]) -> StoreSplit:
    """The split a run validates on: `val`, or `test` for a dataset without one."""
    val = StoreSplit.open(dataset_dir, "val", classes)
    return val if val.rows else StoreSplit.open(dataset_dir, "test", classes)


def validation_warning(dataset_dir: str | os.PathLike) -> str | None:
    """What it costs when a dataset has no validation split: model selection sees the test images."""
    split = validation_split(dataset_dir, [])
    if split.split == "val":
        return None
    return (f"{Path(dataset_dir).name} has no validation split, so training validates on its {split.split} split: "
            "early stopping, plateau schedules and the champion gate choose on the very images the held-out "
            "figure is reported on, which flatters it; ingest the source again into a new dataset to carve "
            "a validation split out of train (--val-fraction)")
