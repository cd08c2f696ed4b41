"""Relabelling: a version that gives images already in a dataset another label.

Committed versions never change, and every reader (training through `cnn.layout`, `read_table`,
`dataset:` sources, cross-validation) reads exactly the parts `manifest.json` lists. So a relabel
copies each part that holds an image it relabels, every row as it was (bytes, split, phash, where
it came from) but for its label, and commits the copies as its version, each naming the part it
`replaces` (`format.derive_manifest`): from that version on, the manifest lists the copy in the
part's place. The dataset keeps its images and their splits, its counts move between classes,
and earlier versions, with work pinned to them (`DatasetStore.as_of`), still read the old labels.
A relabel rewrites the parts that hold the images it changes, not the dataset.

Its staging folder, `staging/NAME/relabel/`, holds a `plan.json` of the changes and of the parts
it copies. A rerun after a crash that arrives at the same plan keeps the copies already
published there (a part is only ever there whole); another plan starts afresh.

A row names its image by its sha256, or else by the file at its path, hashed. A file whose bytes
the store re-encoded (`--resize`, or a conversion to PNG) does not hash to its image's sha256:
one named `<first 16 hex digits of that sha256>.<suffix>`, as `cnnpipe review export` names an
image it read back from the store, is found by that prefix once its bytes hash as the stored
image's do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cnn.failpoints import failpoint
from cnnpipe.base.fsutil import atomic_write_json, fsync_dir, fsync_file
from cnnpipe.base.locations import Folder, ObjectStore
from cnnpipe.errors import CnnpipeError
from cnnpipe.sources import ManifestSource, Source
from cnnpipe.store.admission import reject
from cnnpipe.store.format import PARQUET_OPTIONS, SCHEMA
from cnnpipe.store.records import Reject, StagedRun

log = logging.getLogger("cnnpipe.store")

_REVIEW_NAME = re.compile(r"[0-9a-f]{16}")


class RelabelStore(Protocol):
    """What a relabel uses of a store; `DatasetStore` is one (named here, not imported, as in staging.py)."""

    name: str
    relabel_staging: Path
    location: Folder | ObjectStore
    filesystem: object

    def exists(self) -> bool: ...
    def latest_version(self) -> int: ...
    def manifest(self) -> dict: ...
    def keep_if_current(self, staging: Path) -> None: ...
    def reading(self, path: Path | str) -> AbstractContextManager[None]: ...


@dataclass
class _Wanted:
    path: str
    label: str
    # The 16 hex digits that start a file's name when the file was hashed from its bytes: the
    # prefix of the stored image's sha256 if it is a store copy that `review export` named.
    prefix: str | None = None


@dataclass
class _Stored:
    sha256: str
    part: str  # as the manifest lists it
    label: str
    split: str


def stage_relabel(store: RelabelStore, source: Source, new_classes: Iterable[str] = (),
                  on_progress: Callable[[int, int | None], None] | None = None) -> StagedRun:
    """Stage the copies of the parts whose images `source` labels otherwise. Labels that are not
    classes of the dataset are refused (`unknown_class`) unless `new_classes` names them. Call
    under `lock()`, then `commit()`."""
    if not store.exists():
        raise CnnpipeError(f"dataset {store.name} does not exist: --relabel corrects the labels of images "
                           "already in it; ingest them without --relabel first")
    staging = store.relabel_staging
    store.keep_if_current(staging)
    run = StagedRun(store.name, source.uri, store.latest_version(), time.time(), relabel=True)
    wanted = _wanted(source, run, on_progress)
    manifest = store.manifest()
    found = _find(store, manifest["files"], wanted)
    classes = set(manifest["classes"]) | set(new_classes)
    changes: dict[str, dict] = {}
    for key, want in wanted.items():
        stored = found.get(key)
        if stored is None:
            _skip(run, want.path, "not_in_dataset", f"no image of dataset {store.name} has sha256 {key[:12]}…; "
                                                    "ingest it without --relabel to add it")
        elif stored.sha256 in changes:  # named twice: by its hash, and by a file the store re-encoded
            earlier = changes[stored.sha256]
            if earlier["new_label"] == want.label:
                run.duplicates += 1
            else:
                reject(run, want.path, "conflict", f"the same image as {earlier['path']}, "
                                                   f"which is relabelled {earlier['new_label']!r}")
        elif want.label == stored.label:
            _skip(run, want.path, "unchanged", f"already labelled {stored.label!r}")
        elif want.label not in classes:
            reject(run, want.path, "unknown_class", f"{want.label!r} is not a class of dataset {store.name}; "
                                                    f"--new-class {want.label} lets a relabel introduce it")
        else:
            changes[stored.sha256] = {"sha256": stored.sha256, "split": stored.split, "old_label": stored.label,
                                      "new_label": want.label, "path": want.path, "part": stored.part}
    order = {entry["path"]: index for index, entry in enumerate(manifest["files"])}
    parts = sorted({change["part"] for change in changes.values()}, key=order.__getitem__)
    plan = {"source_uri": source.uri, "parts": parts,
            "changes": sorted([change["sha256"], change["new_label"]] for change in changes.values())}
    if not changes:
        shutil.rmtree(staging, ignore_errors=True)
        return run
    _start(staging, plan, run.base_version)
    for index, part in enumerate(parts):
        name = f"part-{index:05d}.parquet"
        run.replaces[name] = part
        if (staging / name).exists():
            log.info("resuming: %s was already copied by an interrupted relabel", part)
            continue
        relabelled = {sha: change["new_label"] for sha, change in changes.items() if change["part"] == part}
        _copy_relabelled(store, part, relabelled, staging / name)
    for change in changes.values():
        run.label_changes.append({k: v for k, v in change.items() if k != "part"})
        run.add_count(change["split"], change["old_label"], -1)
        run.add_count(change["split"], change["new_label"], 1)
        run.add_content(change["sha256"], change["new_label"], change["split"])
    run.added_counts = {split: {label: n for label, n in labels.items() if n}
                        for split, labels in run.added_counts.items()}
    return run


def _wanted(source: Source, run: StagedRun, on_progress: Callable[[int, int | None], None] | None
            ) -> dict[str, _Wanted]:
    """The label each image of `source` is to have, by the hash that names it; refuses what
    cannot be read, has no label, or is listed twice with two labels."""
    wanted: dict[str, _Wanted] = {}
    # A manifest row that gives its hash names the image: its file need not be read, or even exist.
    entries = source.entries(read_hashed=False) if isinstance(source, ManifestSource) else source.entries()
    done = 0
    for done, entry in enumerate(entries, start=1):
        if on_progress and done % 64 == 0:
            on_progress(done, source.total)
        if entry.reject_reason:
            reject(run, entry.path, entry.reject_reason, entry.reject_detail)
            continue
        if entry.label is None:
            reject(run, entry.path, "no_label", source.unlabelled)
            continue
        key = entry.content_sha256 or hashlib.sha256(entry.data).hexdigest()
        stem = posixpath.basename(entry.path).partition(".")[0].lower()
        prefix = stem if entry.content_sha256 is None and _REVIEW_NAME.fullmatch(stem) else None
        earlier = wanted.get(key)
        if earlier is None:
            wanted[key] = _Wanted(entry.path, entry.label, prefix)
        elif earlier.label == entry.label:
            run.duplicates += 1
        else:
            reject(run, entry.path, "conflict",
                   f"the same image as {earlier.path}, listed with label {earlier.label!r}")
    if on_progress:
        on_progress(done, source.total)
    return wanted


def _find(store: RelabelStore, files: list[dict], wanted: dict[str, _Wanted]) -> dict[str, _Stored]:
    """Where each wanted image is stored, by the key `wanted` has it under: reads the hash, label
    and split columns of every part, and the image of a row only to confirm a name's prefix."""
    found: dict[str, _Stored] = {}
    if not wanted:
        return found
    keys = pa.array(sorted(wanted), pa.string())
    by_prefix = {want.prefix: key for key, want in wanted.items() if want.prefix}
    prefixes = pa.array(sorted(by_prefix), pa.string())
    candidates: list[tuple[str, _Stored]] = []
    for entry in files:
        path = store.location.file(entry["path"])
        with store.reading(path):
            table = pq.read_table(path, columns=["sha256", "label", "split"], filesystem=store.filesystem)
        hashes = table.column("sha256")
        hit = pc.is_in(hashes, value_set=keys)
        if by_prefix:
            hit = pc.or_(hit, pc.is_in(pc.utf8_slice_codeunits(hashes, 0, 16), value_set=prefixes))
        for sha, label, split in zip(*(table.filter(hit).column(c).to_pylist() for c in ("sha256", "label", "split"))):
            stored = _Stored(sha, entry["path"], label, split)
            if sha in wanted:
                found[sha] = stored
            else:
                candidates.append((by_prefix[sha[:16]], stored))
    for key, stored in candidates:
        if key not in found and _stored_image_hash(store, stored) == key:
            found[key] = stored
    return found


def _stored_image_hash(store: RelabelStore, stored: _Stored) -> str:
    path = store.location.file(stored.part)
    with store.reading(path):
        table = pq.read_table(path, columns=["image"], filters=[("sha256", "==", stored.sha256)],
                              filesystem=store.filesystem)
    return hashlib.sha256(table.column("image")[0].as_py()).hexdigest()


def _skip(run: StagedRun, path: str, reason: str, detail: str) -> None:
    skipped = Reject(path, reason, detail)
    run.skipped.append(skipped)
    log.info("not relabelled: %s", skipped.line(run.source_uri))


def _start(staging: Path, plan: dict, base_version: int) -> None:
    """Keep what an interrupted run of the same plan copied; start afresh for any other."""
    planned = staging / "plan.json"
    if not (planned.exists() and json.loads(planned.read_text()) == plan):
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    for partial in staging.glob("*.tmp"):
        partial.unlink()
    atomic_write_json(staging / "base.json", {"base_version": base_version})
    atomic_write_json(planned, plan)


def _copy_relabelled(store: RelabelStore, part: str, labels: dict[str, str], target: Path) -> None:
    """Publish a copy of the committed `part` whose rows `labels` (sha256 -> label) names carry
    their new label, row group for row group, as `parts.publish_rows` publishes: whole or not at all."""
    path = store.location.file(part)
    partial = target.with_name(target.name + ".tmp")
    with store.reading(path):
        parquet = pq.ParquetFile(path, filesystem=store.filesystem)
    try:
        with pq.ParquetWriter(partial, SCHEMA, **PARQUET_OPTIONS) as writer:
            for group in range(parquet.num_row_groups):
                with store.reading(path):
                    rows = parquet.read_row_group(group)
                writer.write_table(_relabelled(rows, labels), row_group_size=rows.num_rows)
        if (written := pq.read_metadata(partial).num_rows) != parquet.metadata.num_rows:
            raise CnnpipeError(f"{partial}: copied {parquet.metadata.num_rows} rows of {path} "
                               f"but the file holds {written}")
        fsync_file(partial)
        failpoint("parquet.before_replace")
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG):
            raise CnnpipeError(f"disk full while writing {partial}: {exc.strerror}") from exc
        raise
    os.replace(partial, target)
    fsync_dir(target.parent)


def _relabelled(rows: pa.Table, labels: dict[str, str]) -> pa.Table:
    """`rows` in the current schema (a column added since they were written is null), relabelled."""
    columns = {name: rows.column(name) if name in rows.column_names
               else pa.nulls(rows.num_rows, SCHEMA.field(name).type) for name in SCHEMA.names}
    columns["label"] = pa.array([labels.get(sha, label) for sha, label in
                                 zip(rows.column("sha256").to_pylist(), rows.column("label").to_pylist())], pa.string())
    return pa.table(columns, schema=SCHEMA)
