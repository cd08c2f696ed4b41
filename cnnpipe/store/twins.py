"""Twins in a dataset: pairs of stored images that are one picture after re-encoding, resizing, a
small crop or a colour shift, found by the Hamming distance of their perceptual hashes.

Ingest stores each image's hash (`cnnpipe.sources.images.stored_image_hash`). Parts written before it
have none: their hashes are computed once from the stored images and kept in the home's cache,
keyed by the version id, since a committed part never changes.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cnnpipe.sources.images import stored_image_hash
from cnnpipe.store.dataset import DatasetStore

log = logging.getLogger("cnnpipe.store")

# Measured on 300 CIFAR-10 train images re-encoded as the leak check's target says (JPEG quality
# 75, 0.9x, brightness +15%): all lie within 8 bits of their original, 99% within 6; of 20,000
# other train images, 2.7% have some image within 8 bits. So 8 bits finds twins, and a second
# look (`cnnpipe.monitoring.audit`) tells them from look-alikes.
CANDIDATE_BITS = 8
HASH_COLUMNS = ["sha256", "label", "split", "phash"]
_BLOCK = 512


@dataclass(frozen=True)
class HashPairs:
    """Pairs (first[i], second[i]) of rows of a hash table, first < second, `bits` apart."""

    first: np.ndarray
    second: np.ndarray
    bits: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def image_hashes(store: DatasetStore) -> pa.Table:
    """sha256, label, split and phash of every image of the dataset's current version."""
    manifest = store.manifest()
    version_ids = {v["version"]: v["version_id"] for v in manifest["versions"]}
    tables = []
    for entry in manifest["files"]:
        path = store.location.file(entry["path"])
        with store.reading(path):
            names = pq.read_schema(path, filesystem=store.filesystem).names
            table = pq.read_table(path, columns=[c for c in HASH_COLUMNS if c in names], filesystem=store.filesystem)
        if "phash" not in names or table["phash"].null_count:
            table = _with_hashes(store, path, table, version_ids[entry["version"]])
        tables.append(table.select(HASH_COLUMNS))
    if not tables:
        return pa.table({name: pa.array([], pa.int64() if name == "phash" else pa.string()) for name in HASH_COLUMNS})
    return pa.concat_tables(tables)


def _with_hashes(store: DatasetStore, path, table: pa.Table, version_id: str) -> pa.Table:
    """`table` with the hashes of a part from before ingest kept them, computed once and cached."""
    cached = store.settings.perceptual_hashes_dir / store.name / version_id / f"{os.path.basename(str(path))}"
    if cached.exists():
        hashes = pq.read_table(cached)
        if hashes["sha256"].equals(table["sha256"]):
            return _set_column(table, "phash", hashes["phash"])
    log.info("%s: computing the perceptual hashes of %d images stored before ingest kept them", path, len(table))
    with store.reading(path):
        images = pq.read_table(path, columns=["image"], filesystem=store.filesystem)["image"].to_pylist()
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # decoding and resizing release the GIL
        phash = pa.array(list(pool.map(stored_image_hash, images)), pa.int64())
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table({"sha256": table["sha256"], "phash": phash}), partial)
    os.replace(partial, cached)
    return _set_column(table, "phash", phash)


def _set_column(table: pa.Table, name: str, values) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def hash_pairs(phash: np.ndarray, max_bits: int = CANDIDATE_BITS) -> HashPairs:
    """Every pair of hashes at most `max_bits` bits apart, by comparing all of them in blocks over
    the cores (NumPy releases the GIL): 60,000 hashes take about 5 s on two cores."""
    hashes = np.ascontiguousarray(phash, dtype=np.int64).view(np.uint64)

    def block(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bits = np.bitwise_count(hashes[start:start + _BLOCK, None] ^ hashes[None, start:])
        rows, columns = np.nonzero(bits <= max_bits)
        keep = columns > rows  # the block's own diagonal and what lies below it are other pairs' mirror
        rows, columns = rows[keep], columns[keep]
        return start + rows, start + columns, bits[rows, columns]

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        found = list(pool.map(block, range(0, len(hashes), _BLOCK)))
    first, second, bits = (np.concatenate([part[i] for part in found]) if found else np.empty(0, np.int64)
                           for i in range(3))
    return HashPairs(first.astype(np.int64), second.astype(np.int64), bits.astype(np.int64))



def stored_images(store: DatasetStore, wanted: set[str]) -> dict[str, bytes]:
    """The stored bytes of the images `wanted` (by sha256) of the dataset's current version."""
    return {sha: row["image"] for sha, row in stored_rows(store, wanted, ["image"]).items()}


def stored_rows(store: DatasetStore, wanted: set[str], columns: list[str]) -> dict[str, dict]:
    """`columns` of the rows `wanted` (by sha256), reading only the row groups that hold one."""
    found: dict[str, dict] = {}
    for path in store.files():
        if len(found) == len(wanted):
            break
        with store.reading(path):
            parquet = pq.ParquetFile(path, filesystem=store.filesystem)
            for group in range(parquet.num_row_groups):
                hashes = parquet.read_row_group(group, columns=["sha256"])["sha256"].to_pylist()
                if wanted.isdisjoint(hashes):
                    continue
                rows = parquet.read_row_group(group, columns=columns).to_pylist()
                found.update((sha, row) for sha, row in zip(hashes, rows) if sha in wanted)
    return found
