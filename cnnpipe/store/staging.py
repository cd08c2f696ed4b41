"""Staging a source into parts under `staging/`, in one run or in shards that one committer merges.

The functions here are `DatasetStore` methods (`stage`, `stage_shard`, `merge_shards`,
`shard_staging`); call them under the store's `lock()`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from cnnpipe.base.fsutil import atomic_write_json, fsync_dir
from cnnpipe.errors import CnnpipeError
from cnnpipe.sources import Source
from cnnpipe.store.admission import Admission, IngestOptions, _ImageIndex, reject_conflict, resolve_options
from cnnpipe.sources.images import CheckedBatch
from cnnpipe.store.decoders import VALIDATION_CHUNK, VALIDATION_CHUNK_BYTES, _Pending, _Validator
from cnnpipe.store.parts import _PartWriter, publish_rows
from cnnpipe.store.records import StagedRun

log = logging.getLogger("cnnpipe.store")


class StagingStore(Protocol):
    """What staging uses of a store; `DatasetStore` is one. Named here, not imported, so that only
    dataset.py, which takes these functions as its methods, imports the other of the two."""

    name: str
    staging: Path
    shards_staging: Path

    def exists(self) -> bool: ...
    def latest_version(self) -> int: ...
    def read_table(self, columns: list[str] | None = None) -> pa.Table: ...
    def keep_if_current(self, staging: Path) -> None: ...
    def shard_staging(self, source_uri: str, count: int) -> Path: ...
    def stage(self, source: Source, options: IngestOptions, on_progress: Callable[[int, int | None], None] | None = None,
              staging: Path | None = None) -> StagedRun: ...


def stage(store: StagingStore, source: Source, options: IngestOptions,
          on_progress: Callable[[int, int | None], None] | None = None,
          staging: Path | None = None) -> StagedRun:
    """Read, hash, deduplicate and validate `source` into staged parts. Call under `lock()`."""
    staging = staging or store.staging
    # The decoders start first: their start-up (a third of a second on 2 cores) overlaps listing the
    # source and reading the store's index, rather than following them.
    with _Validator(options.resize, options.workers) as validator:
        options = resolve_options(source, options)
        stager = _Stager(store, source, options, staging)
        try:
            stager.read(validator, on_progress)
        except BaseException as exc:
            partial = stager.writer.discard()
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise CnnpipeError(f"disk full while writing {partial or staging}: {exc.strerror}") from exc
            raise
    if on_progress:
        on_progress(stager.done, source.total)
    return stager.finish()


class _Stager:
    """One `stage()` run: admits the entries, sends new images to the decoders, writes the kept ones."""

    def __init__(self, store: StagingStore, source: Source, options: IngestOptions, staging: Path):
        self.source, self.options = source, options
        base_version = store.latest_version()
        self.run = StagedRun(store.name, source.uri, base_version, time.time(),
                             val_from_train=options.val_fraction if options.carve_val_from_train else 0.0)
        staging.mkdir(parents=True, exist_ok=True)
        atomic_write_json(staging / "base.json", {"base_version": base_version})
        self.admission = Admission(self.run, _known_images(store, self.run, staging), options, source.unlabelled)
        self.added: defaultdict[str, Counter] = defaultdict(Counter)
        self.ingested_at = datetime.now(timezone.utc)
        next_index = 1 + max((int(p.name[5:10]) for p in staging.glob("part-*.parquet")), default=-1)
        self.writer = _PartWriter(staging, next_index)
        self.done = 0

    def read(self, validator: _Validator, on_progress: Callable[[int, int | None], None] | None) -> None:
        chunk: list[_Pending] = []
        chunk_bytes = 0
        for entry in self.source.entries():
            self.done += 1
            item = self.admission.admit(entry)
            if item is not None:
                chunk.append(item)
                chunk_bytes += len(item.entry.data)
            if len(chunk) >= VALIDATION_CHUNK or chunk_bytes >= VALIDATION_CHUNK_BYTES:
                self.accept(validator.submit(chunk))
                chunk, chunk_bytes = [], 0
            if on_progress and self.done % 64 == 0:
                on_progress(self.done, self.source.total)
        self.accept(validator.submit(chunk))
        self.accept(validator.drain())
        self.writer.close()

    def accept(self, verdicts: Iterator[tuple[list[_Pending], CheckedBatch]]) -> None:
        for chunk, batch in verdicts:
            self._keep(chunk, batch)

    def _keep(self, chunk: list[_Pending], batch: CheckedBatch) -> None:
        settle, refused = self.admission.settle, batch.refused
        kept = [index for index, item in enumerate(chunk) if settle(item, refused.get(index))]
        if not kept:
            return
        whole = len(kept) == len(chunk)
        items = chunk if whole else [chunk[index] for index in kept]

        def column(values: list) -> list:
            return values if whole else [values[index] for index in kept]

        encoded = batch.encoded
        self.writer.add({
            "sha256": [item.sha256 for item in items],
            "image": [encoded.get(index) or item.entry.data for index, item in zip(kept, items)] if encoded
            else [item.entry.data for item in items],
            "format": column(batch.formats),
            "width": column(batch.widths),
            "height": column(batch.heights),
            "n_frames": column(batch.n_frames),
            "label": [item.label for item in items],
            "split": [item.split for item in items],
            "source_uri": [self.source.uri] * len(items),
            "member_path": [item.entry.path for item in items],
            "ingested_at": [self.ingested_at] * len(items),
            "phash": column(batch.phashes),
        })
        for item in items:
            self.added[item.split][item.label] += 1
        self.run.add_contents((item.sha256, item.label, item.split) for item in items)
        self.run.rows += len(items)

    def finish(self) -> StagedRun:
        self.run.hidden_skipped = self.source.hidden_skipped
        for split, labels in self.added.items():
            for label, count in labels.items():
                self.run.add_count(split, label, count)
        return self.run


def _known_images(store: StagingStore, run: StagedRun, staging: Path) -> _ImageIndex:
    """The images of the store and of the parts an interrupted run staged, which `run` adopts."""
    known = _ImageIndex()
    stored = store.read_table(["sha256", "label", "split"]) if store.exists() else None
    adopted = [pq.read_table(p, columns=["sha256", "label", "split"])
               for p in sorted(staging.glob("part-*.parquet"))]
    for table in ([stored] if stored is not None else []) + adopted:
        for sha, label, split in zip(*(table.column(c).to_pylist() for c in ("sha256", "label", "split"))):
            known.add(sha, label, split)
    for table in adopted:
        run.adopted_rows += table.num_rows
        for sha, label, split in zip(*(table.column(c).to_pylist() for c in ("sha256", "label", "split"))):
            run.add_content(sha, label, split)
            run.add_count(split, label)
    if run.adopted_rows:
        log.info("resuming: %d images were already staged by an interrupted run", run.adopted_rows)
    return known


# ---- sharded ingestion (one writer, many stagers) ------------------------------


def shard_staging(store: StagingStore, source_uri: str, count: int) -> Path:
    # The same source and shard count find the same folders again after a crash.
    key = hashlib.sha256(f"{source_uri}\0{count}".encode()).hexdigest()[:16]
    return store.shards_staging / key


def stage_shard(store: StagingStore, source: Source, options: IngestOptions, index: int, count: int) -> StagedRun:
    """Stage shard `index` of `count` of `source`, committing nothing. A shard that
    finished before a crash is not read again; one that died midway adopts its parts."""
    directory = store.shard_staging(source.uri, count) / f"shard-{index:05d}"
    store.keep_if_current(directory)
    finished = directory / "staged.json"
    if finished.exists():
        return StagedRun.from_json(json.loads(finished.read_text()))
    # Every shard must take the whole source's decision: callers should pass it resolved.
    options = resolve_options(source, options)
    run = store.stage(source.sharded(index, count), options, staging=directory)
    atomic_write_json(finished, run.to_json())
    return run


def merge_shards(store: StagingStore, shards: list[StagedRun], count: int) -> StagedRun:
    """Join the shards' staged parts into `next/`, as one run would have staged them.
    Shards split a source by path, so identical images can reach two of them: the
    first shard keeps it and later copies count as duplicates, or conflicts when their
    label or split differ, as in one run. Call under `lock()`."""
    source_uri = shards[0].source_uri
    base_version = store.latest_version()
    if any(shard.base_version != base_version for shard in shards):
        raise CnnpipeError(f"dataset {store.name} gained a version while {source_uri} was staging; rerun")
    merged = StagedRun(store.name, source_uri, base_version, min(shard.started_at for shard in shards),
                       duplicates=sum(shard.duplicates for shard in shards),
                       rejected=[reject for shard in shards for reject in shard.rejected],
                       val_from_train=max(shard.val_from_train for shard in shards),
                       hidden_skipped=sum(shard.hidden_skipped for shard in shards))
    if store.staging.exists():
        shutil.rmtree(store.staging)
    store.staging.mkdir(parents=True)
    atomic_write_json(store.staging / "base.json", {"base_version": base_version})
    seen = _ImageIndex()
    parts = sorted(store.shard_staging(source_uri, count).glob("shard-*/part-*.parquet"))
    for index, part in enumerate(parts):
        keys = pq.read_table(part, columns=["sha256", "label", "split", "member_path"])
        keep = []
        for row, (sha, label, split, path) in enumerate(zip(*(column.to_pylist() for column in keys.columns))):
            stored = seen.get(sha)
            if stored is None:
                seen.add(sha, label, split)
                keep.append(row)
                merged.add_content(sha, label, split)
                merged.add_count(split, label)
            elif stored == (label, split):
                merged.duplicates += 1
            else:
                reject_conflict(merged, path, stored)
        merged.rows += len(keep)
        target = store.staging / f"part-{index:05d}.parquet"
        if len(keep) == keys.num_rows:
            os.link(part, target)  # the same file, not a copy: staging is one filesystem
        elif keep:
            publish_rows(part, keep, target)
    fsync_dir(store.staging)
    return merged
