"""Verified, atomically published Parquet parts: written aside, checked, fsynced, then renamed.

A part is the unit a killed run resumes from: one that is there under its final name is
complete, since only `*.tmp` files are ever half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cnn.failpoints import failpoint
from cnnpipe.base.arrow_rows import binaries, moments, optional_integers, strings
from cnnpipe.base.fsutil import fsync_dir, fsync_file
from cnnpipe.errors import CnnpipeError
from cnnpipe.store.format import PARQUET_OPTIONS, SCHEMA

# A row group is the unit a streaming reader fetches and shuffles: ~1,024 images (at most
# 32 MiB) keeps a shuffle buffer of a few groups small while leaving many groups per file
# to shuffle, and is still large enough that per-group metadata and seeks cost nothing.
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 32 * 1024 * 1024
# Parts are the unit a killed run resumes from, so they close every 16 row groups too.
PART_BYTES = 512 * 1024 * 1024
PART_ROW_GROUPS = 16


def _as_table(columns: dict[str, list]) -> pa.Table:
    """Python values, a list a column, as a table of `SCHEMA` (built as `arrow_rows` builds, not by `pa.table`)."""
    def column(field: pa.Field, values: list):
        if field.type == pa.string():
            return strings(values)
        if field.type == pa.binary():
            return binaries(values)
        if pa.types.is_timestamp(field.type):
            return moments(values)
        return optional_integers(values, field.type)

    return pa.Table.from_arrays([column(field, columns[field.name]) for field in SCHEMA], schema=SCHEMA)


class _PartWriter:
    """Writes numbered Parquet parts, each published only once complete and verified."""

    def __init__(self, directory: Path, first_index: int):
        self.directory = directory
        self.index = first_index
        self.columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.group_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.tmp_path: Path | None = None
        self.file_rows = self.file_bytes = self.file_groups = 0

    def add(self, rows: dict[str, list]) -> None:
        """Append rows given as columns; flushes a row group whenever one is full."""
        for name in SCHEMA.names:
            self.columns[name].extend(rows[name])
        self.group_bytes += sum(map(len, rows["image"]))
        while len(self.columns["sha256"]) >= ROW_GROUP_ROWS or self.group_bytes >= ROW_GROUP_BYTES:
            self._write_group(limit=ROW_GROUP_ROWS)

    def close(self) -> None:
        self._write_group()
        self._publish()

    def discard(self) -> Path | None:
        """Remove the part being written, if any, after a failure; return its path. A `.tmp`
        is never resumed from, and on a full disk it holds space the user needs back."""
        partial, self.tmp_path = self.tmp_path, None
        if self.writer is not None:
            # Closing writes the footer, which fails again on a full disk: the file goes anyway.
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        if partial is not None:
            partial.unlink(missing_ok=True)
        return partial

    def _write_group(self, limit: int | None = None) -> None:
        rows = len(self.columns["sha256"])
        if limit is not None and self.group_bytes < ROW_GROUP_BYTES:
            rows = min(rows, limit)
        if rows == 0:
            return
        if self.writer is None:
            self.tmp_path = self.directory / f"part-{self.index:05d}.parquet.tmp"
            self.writer = pq.ParquetWriter(self.tmp_path, SCHEMA, **PARQUET_OPTIONS)
        if rows == len(self.columns["sha256"]):
            group, self.columns = self.columns, {name: [] for name in SCHEMA.names}
        else:
            group = {name: values[:rows] for name, values in self.columns.items()}
            self.columns = {name: values[rows:] for name, values in self.columns.items()}
        self.writer.write_table(_as_table(group), row_group_size=rows)
        failpoint("parquet.after_rowgroup")
        written_bytes = sum(map(len, group["image"]))
        self.file_rows += rows
        self.file_bytes += written_bytes
        self.group_bytes -= written_bytes
        self.file_groups += 1
        if self.file_bytes >= PART_BYTES or self.file_groups >= PART_ROW_GROUPS:
            self._publish()

    def _publish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        written = pq.read_metadata(self.tmp_path).num_rows
        if written != self.file_rows:
            raise CnnpipeError(f"{self.tmp_path}: wrote {self.file_rows} rows but the file holds {written}")
        fsync_file(self.tmp_path)
        failpoint("parquet.before_replace")
        os.replace(self.tmp_path, self.tmp_path.with_suffix(""))
        fsync_dir(self.directory)
        self.writer, self.tmp_path = None, None
        self.file_rows = self.file_bytes = self.file_groups = 0
        self.index += 1


def publish_rows(part: Path, rows: list[int], target: Path) -> None:
    """Publish the `rows` (indices) of `part` as the part `target`. The caller fsyncs the folder."""
    partial = target.with_name(target.name + ".tmp")
    try:
        pq.write_table(pq.read_table(part).take(rows), partial, row_group_size=ROW_GROUP_ROWS, **PARQUET_OPTIONS)
        fsync_file(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)


def _rows_in(part: Path) -> int | None:
    """A local part's row count from its footer; None when it does not read, to fetch it again."""
    try:
        return pq.read_metadata(part).num_rows
    except (pa.ArrowException, OSError):
        return None


def part_problem(path: Path | str, filesystem, committed_rows: int, read_rows: bool) -> str | None:
    """What is wrong with a committed part, None when nothing: another number of rows than
    committed, or with `read_rows`, images that do not hash to their row's sha256. The sha256 is the
    source file's: an image that ingest converted (to PNG, or resized) is stored as other bytes, so
    such a row is sound when its image passes ingest's full check and keeps its perceptual hash, to within
    the few bits that decoding a re-encoded JPEG moves it."""
    parquet = pq.ParquetFile(path, filesystem=filesystem)
    if parquet.metadata.num_rows != committed_rows:
        return f"holds {parquet.metadata.num_rows} rows where {committed_rows} were committed"
    if not read_rows:
        return None
    columns = ["sha256", "image", "member_path"] + (["phash"] if "phash" in parquet.schema_arrow.names else [])
    mismatched, row = [], 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group, columns=columns)
        for sha, image, member, *phash in zip(*(table.column(c).to_pylist() for c in columns)):
            if hashlib.sha256(image).hexdigest() != sha and not _converted_and_sound(image, *phash):
                mismatched.append(f"row {row} ({member})")
            row += 1
    if not mismatched:
        return None
    shown = ", ".join(mismatched[:5]) + (", ..." if len(mismatched) > 5 else "")
    return f"{len(mismatched)} of {row} rows hold an image that does not hash to their sha256: {shown}"


# Resized rows keep the hash of the pixels before their JPEG encoding: decoded again, 800 CIFAR-10
# images resized to 24 and 64 px hashed 0 to 4 bits away from it.
_REENCODED_HASH_BITS = 6


def _converted_and_sound(image: bytes, phash: int | None = None) -> bool:
    from cnnpipe.sources.images import check_image

    if phash is None:  # a part from before the perceptual hash: nothing to compare the pixels with
        return False
    try:
        return (check_image(image, with_hash=True).phash ^ phash).bit_count() <= _REENCODED_HASH_BITS
    except Exception:  # noqa: BLE001 - refused, or failing as Pillow reads it further: damaged either way
        return False
