"""A dataset of the store as a source to classify: `dataset:NAME`, or `dataset:NAME/SPLIT`."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow.parquet as pq

from cnnpipe.errors import CnnpipeError
from cnnpipe.sources import Entry, Source
from cnnpipe.store.dataset import DatasetStore


class DatasetSource(Source):
    """A dataset of the store as a source to classify: `dataset:NAME`, or `dataset:NAME/SPLIT`
    for one split. Rows carry the content hash they were stored under."""

    kind = "dataset"

    def __init__(self, store: DatasetStore, split: str | None = None):
        super().__init__(f"dataset:{store.name}" + (f"/{split}" if split else ""), None, str(store.location))
        self.store, self.split = store, split
        counts = store.manifest()["counts"]
        self.total = sum(sum(labels.values()) for name, labels in counts.items() if split in (None, name))

    def entries(self) -> Iterator[Entry]:
        for path in self.store.files():
            with self.store.reading(path):
                parquet = pq.ParquetFile(path, filesystem=self.store.filesystem)
            for group in range(parquet.num_row_groups):
                if not self._mine(f"{path}:{group}"):
                    continue
                with self.store.reading(path):
                    table = parquet.read_row_group(group, columns=["sha256", "image", "split", "member_path"])
                for sha, image, split, member in zip(*(table.column(c).to_pylist() for c in table.column_names)):
                    if self.split is None or split == self.split:
                        yield Entry(member, None, None, image, content_sha256=sha)


def open_dataset_source(uri: str) -> DatasetSource:
    """`dataset:NAME` or `dataset:NAME/SPLIT`."""
    name, _, split = uri.removeprefix("dataset:").partition("/")
    store = DatasetStore(name)
    if not store.exists():
        raise CnnpipeError(f"{uri}: no dataset named {name!r} (`cnnpipe datasets` lists them)")
    if split and split not in store.manifest()["counts"]:
        raise CnnpipeError(f"{uri}: dataset {name} has no split {split!r}")
    return DatasetSource(store, split or None)
