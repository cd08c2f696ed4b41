"""A dataset's splits in the Parquet store, and which of them a run trains and validates on.

`StoreSplit` locates one split's rows without the store's code; `validation_split` picks the
split a run validates on; `require_two_train_classes` and `validation_warning` say, before a
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


def require_two_train_classes(dataset_dir: str | os.PathLike) -> None:
    """Refuse a train split of one class: the model would learn to answer that class always, score
    100% on a validation split of the same class, and be crowned champion."""
    counts = PublishedDataset.open(dataset_dir).counts("train")
    classes = sorted(label for label, images in counts.items() if images)
    if len(classes) < 2:
        found = f"only class {classes[0]!r}" if classes else "no images"
        raise ValueError(f"the train split of {Path(dataset_dir).name} has {found}: a classifier needs images of "
                         "at least two classes; ingest another class's images into it first")


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
