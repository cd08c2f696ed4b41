"""The versioned, deduplicated Parquet image store.

Layout of `$CNNPIPE_HOME/datasets/NAME/`:

    manifest.json            committed files, classes, counts, current version and its id
    rejected.json            every refused input: source, path, reason
    v000001/part-00000.parquet
    v000001/version.json     what that version added
    v000002/...

A version is staged under `$CNNPIPE_HOME/staging/NAME/next/` and committed by renaming
that whole folder to `vNNNNNN`: one atomic step, so `datasets/NAME/**/*.parquet` sees
exactly the committed rows. `manifest.json` is derived from the `version.json` files
and rebuilt if a crash left it behind, or if it is damaged (the damaged copy is kept
beside it as `manifest.json.corrupt-TIME`). Staged parts that were complete when a run died
are adopted by the next run, which then only reads what is still missing.

The store can also live on object storage (`CNNPIPE_DATASETS_URL=s3://bucket/datasets`,
or any fsspec URL), where `cnnpipe.locations` commits a version by its `version.json`
instead of a rename. Staging stays local.

On a Ray cluster, each shard of a source stages its own parts under
`staging/NAME/shards/KEY/shard-NNNNN/`; one committer then merges them into `next/`,
dropping images that two shards both found, and commits as above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cnnpipe.errors import CnnpipeError
from cnn.failpoints import failpoint
from cnn.layout import FORMAT
from cnnpipe.fsutil import atomic_write_json, fsync_dir, fsync_file
from cnnpipe.locations import DamagedJson, Folder, location
from cnnpipe.locks import file_lock
from cnnpipe.images import CheckedImage, check_batch
from cnnpipe.settings import Settings, get_settings
from cnnpipe.sources import TRANSIENT_ERRORS, Entry, Source

log = logging.getLogger("cnnpipe.store")

SCHEMA = pa.schema([
    ("sha256", pa.string()),
    ("image", pa.binary()),
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("n_frames", pa.int32()),
    ("label", pa.string()),
    ("split", pa.string()),
    ("source_uri", pa.string()),
    ("member_path", pa.string()),
    ("ingested_at", pa.timestamp("us", tz="UTC")),
])
# A row group is the unit a streaming reader fetches and shuffles: ~1,024 images (at most
# 32 MiB) keeps a shuffle buffer of a few groups small while leaving many groups per file
# to shuffle, and is still large enough that per-group metadata and seeks cost nothing.
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 32 * 1024 * 1024
# Parts are the unit a killed run resumes from, so they close every 16 row groups too.
PART_BYTES = 512 * 1024 * 1024
PART_ROW_GROUPS = 16
PARQUET_OPTIONS = {
    # Images are already compressed and hashes do not compress: zstd only where it pays.
    "compression": {name: "zstd" if name in ("member_path", "ingested_at") else "none" for name in SCHEMA.names},
    "use_dictionary": ["format", "label", "split", "source_uri"],
}
VALIDATION_CHUNK = 256
# A decoder that hangs must not hang the ingest: a chunk of images gets CHUNK_TIMEOUT
# seconds, then its images are retried one by one with ITEM_TIMEOUT seconds each.
CHUNK_TIMEOUT = 300.0
ITEM_TIMEOUT = 30.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class IngestOptions:
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    resize: int | None = None
    # Decoding processes; None leaves one core to the reader, 0 decodes in this process.
    workers: int | None = None
    # Whether `val_fraction` of a source's train/ images become its validation split, for a
    # source with train/ but no val/ folder (see `split_for_train`). None: decide from the
    # source when staging (`resolve_options`); shards get the decision taken once on the whole.
    carve_val_from_train: bool | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise CnnpipeError("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
        if self.resize is not None and self.resize < 8:
            raise CnnpipeError(f"--resize {self.resize}: expected a size of at least 8 pixels")


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    detail: str

    def line(self, source_uri: str) -> str:
        return f"{source_uri} :: {self.path}: {self.reason} ({self.detail})"


@dataclass(frozen=True)
class DamagedPart:
    path: Path | str
    version: int
    problem: str


@dataclass
class StagedRun:
    dataset: str
    source_uri: str
    base_version: int
    started_at: float
    rows: int = 0
    adopted_rows: int = 0
    duplicates: int = 0
    rejected: list[Reject] = field(default_factory=list)
    added_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # Sum of the new images' hashes mod 2^256: an order-free digest of what this version adds.
    content_sum: int = 0
    # The share of train/ images carved into val (0: none were), for the report.
    val_from_train: float = 0.0
    # Dot-files and __MACOSX/ members the source passed over by rule, for the report.
    hidden_skipped: int = 0

    def add_content(self, sha256_hex: str) -> None:
        self.content_sum = (self.content_sum + int(sha256_hex, 16)) % 2**256

    def add_count(self, split: str, label: str, count: int = 1) -> None:
        labels = self.added_counts.setdefault(split, {})
        labels[label] = labels.get(label, 0) + count

    def to_json(self) -> dict:
        return {**asdict(self), "content_sum": f"{self.content_sum:064x}"}

    @classmethod
    def from_json(cls, value: dict) -> StagedRun:
        return cls(**{**value, "content_sum": int(value["content_sum"], 16),
                      "rejected": [Reject(**reject) for reject in value["rejected"]]})


@dataclass
class IngestSummary:
    dataset: str
    source_uri: str
    version: int
    version_id: str
    added: int
    duplicates: int
    rejected: list[Reject]
    added_counts: dict[str, dict[str, int]]
    counts: dict[str, dict[str, int]]
    total_rows: int
    seconds: float
    val_from_train: float = 0.0
    hidden_skipped: int = 0

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(reject.reason for reject in self.rejected).most_common())


def split_for(sha256_hex: str, val_fraction: float, test_fraction: float) -> str:
    """A stable split from the content hash, so an image never changes split between versions."""
    position = int(sha256_hex[:16], 16) / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def split_for_train(sha256_hex: str, val_fraction: float, test_fraction: float) -> str:
    """The split of an image from a train/ folder of a source that has no val/ folder: "val"
    for the same hash band as an unsplit image's val (a share `val_fraction` of them), else
    "train". So an image is val both ways, and never moves out of train into test."""
    return "val" if split_for(sha256_hex, val_fraction, test_fraction) == "val" else "train"


def resolve_options(source: Source, options: IngestOptions) -> IngestOptions:
    """Options with `carve_val_from_train` decided, from the whole source when still None:
    carve when it names train but not val and `val_fraction` is above 0. Take it once per
    source (the parent of its shards), since an archive's member headers are read for it."""
    if options.carve_val_from_train is not None:
        return options
    splits = source.explicit_splits()
    carve = options.val_fraction > 0 and "train" in splits and "val" not in splits
    if carve:
        log.info("no val/ folder in %s: %.0f%% of train/ images (by hash) become the validation split "
                 "(--val-fraction)", source.uri, 100 * options.val_fraction)
    return replace(options, carve_val_from_train=carve)


def _die_with_parent() -> None:
    """Decoding workers must not outlive an ingest killed with SIGKILL, which cannot stop them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _kill(pool: ProcessPoolExecutor) -> None:
    # A running call cannot be cancelled, and a hung one would block shutdown: end the workers.
    for process in list((pool._processes or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_die_with_parent)


@dataclass
class _Pending:
    entry: Entry
    sha256: str
    label: str
    split: str


class _Validator:
    """Decodes chunks of images in worker processes, in order, with bounded memory."""

    def __init__(self, resize: int | None, workers: int | None):
        self.resize = resize
        # The reading, hashing and writing process keeps one core busy; decoders get the rest.
        self.workers = max(1, (os.cpu_count() or 2) - 1) if workers is None else workers
        self.pool: ProcessPoolExecutor | None = None
        self.inflight: deque[tuple[list[_Pending], Future]] = deque()

    def __enter__(self) -> _Validator:
        if self.workers:
            # Start the workers now: their start-up then overlaps listing the source.
            self.pool = _worker_pool(self.workers)
            self.pool.submit(check_batch, [], None)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def submit(self, chunk: list[_Pending]) -> Iterator[tuple[_Pending, CheckedImage | tuple[str, str]]]:
        datas = [item.entry.data for item in chunk]
        if self.workers == 0 or (self.pool is None and len(chunk) < VALIDATION_CHUNK):
            # Small sources are not worth starting processes for.
            yield from zip(chunk, check_batch(datas, self.resize))
            return
        if self.pool is None:
            self.pool = _worker_pool(self.workers)
        self.inflight.append((chunk, self.pool.submit(check_batch, datas, self.resize)))
        while len(self.inflight) > 2 * self.workers:
            yield from self._collect()

    def drain(self) -> Iterator[tuple[_Pending, CheckedImage | tuple[str, str]]]:
        while self.inflight:
            yield from self._collect()

    def _collect(self) -> Iterator[tuple[_Pending, CheckedImage | tuple[str, str]]]:
        chunk, future = self.inflight.popleft()
        try:
            results = future.result(timeout=CHUNK_TIMEOUT)
        except (BrokenProcessPool, TimeoutError):
            results = self._isolate(chunk)
        yield from zip(chunk, results)

    def _isolate(self, chunk: list[_Pending]) -> list[CheckedImage | tuple[str, str]]:
        """A decoder killed or hung a worker: find the culprit, keep the rest."""
        _kill(self.pool)
        results: list[CheckedImage | tuple[str, str]] = []
        remaining = chunk
        while remaining:
            # One worker runs them in order, so the first broken or late future is the culprit.
            single = _worker_pool(1)
            futures = [single.submit(check_batch, [item.entry.data], self.resize) for item in remaining]
            for index, future in enumerate(futures):
                try:
                    results.append(future.result(timeout=ITEM_TIMEOUT)[0])
                except (BrokenProcessPool, TimeoutError) as exc:
                    results.append(("decoder_crashed", "the decoding process died on this file")
                                   if isinstance(exc, BrokenProcessPool)
                                   else ("decode_timeout", f"decoding took over {ITEM_TIMEOUT:.0f} s"))
                    remaining = remaining[index + 1:]
                    break
            else:
                remaining = []
            _kill(single)
        self.pool = _worker_pool(self.workers)
        pending, self.inflight = self.inflight, deque()
        for later_chunk, _ in pending:
            self.inflight.append((later_chunk, self.pool.submit(
                check_batch, [item.entry.data for item in later_chunk], self.resize)))
        return results


class _ImageIndex:
    """SHA-256 -> (label, split) of every stored image, at about 100 bytes an image.

    Keys are 32-byte digests rather than hex strings, and values small integers into a
    table of (label, split) pairs: a store has few of those and millions of images.
    """

    def __init__(self) -> None:
        self._codes: dict[bytes, int] = {}
        self._pairs: list[tuple[str, str]] = []
        self._pair_codes: dict[tuple[str, str], int] = {}

    def add(self, sha256_hex: str, label: str, split: str) -> None:
        code = self._pair_codes.setdefault((label, split), len(self._pairs))
        if code == len(self._pairs):
            self._pairs.append((label, split))
        self._codes[bytes.fromhex(sha256_hex)] = code

    def get(self, sha256_hex: str) -> tuple[str, str] | None:
        code = self._codes.get(bytes.fromhex(sha256_hex))
        return None if code is None else self._pairs[code]

    def remove(self, sha256_hex: str) -> None:
        del self._codes[bytes.fromhex(sha256_hex)]


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
        self.writer.write_table(pa.table(group, schema=SCHEMA), row_group_size=rows)
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


class DatasetStore:
    def __init__(self, name: str, settings: Settings | None = None):
        if not _NAME.match(name):
            raise CnnpipeError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-'")
        self.name = name
        self.settings = settings or get_settings()
        self.location = location(f"{self.settings.datasets_url.rstrip('/')}/{name}")
        self.staging = self.settings.staging_dir / name / "next"
        self.shards_staging = self.settings.staging_dir / name / "shards"

    # ---- reading -------------------------------------------------------------------

    @property
    def root(self) -> Path | str:
        """The dataset's folder, or its URL on object storage."""
        return self.location.path if isinstance(self.location, Folder) else self.location.url

    @property
    def filesystem(self):
        """What pyarrow needs, beside a path of `files()`, to open it."""
        return self.location.filesystem

    def exists(self) -> bool:
        return bool(self.location.versions())

    def manifest(self) -> dict:
        """The current manifest; derived afresh if it does not list the committed versions."""
        manifest = self._stored_manifest()
        return manifest if self._lists_every_version(manifest) else self._derive_manifest()

    def _lists_every_version(self, manifest: dict | None) -> bool:
        # Comparing the whole list, not the latest number, also catches a version folder
        # that was moved out of the dataset to repair it (see `repair`).
        return manifest is not None and [f"v{v['version']:06d}" for v in manifest["versions"]] == self.location.versions()

    def _stored_manifest(self) -> dict | None:
        """`manifest.json` as stored (None when missing), a damaged one replaced by one rebuilt
        from the versions. Readers repair it too: every manifest written is what the version.json
        files say, so two repairs agree, and one that lags is rebuilt as after a crash."""
        try:
            return self.location.read_json("manifest.json")
        except DamagedJson as exc:
            aside = f"manifest.json.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
            self.location.copy("manifest.json", aside)
            manifest = self._derive_manifest()
            self.location.write_json("manifest.json", manifest)
            log.warning("%s; rebuilt it from the version.json files and kept the damaged copy as %s", exc, aside)
            return manifest

    def files(self) -> list[Path | str]:
        return [self.location.file(entry["path"]) for entry in self.manifest()["files"]]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        files = self.files()
        if not files:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        tables = []
        for path in files:
            with self._reading(path):
                tables.append(pq.read_table(path, columns=columns, filesystem=self.filesystem))
        return pa.concat_tables(tables)

    def verify(self, read_rows: bool = False) -> list[DamagedPart]:
        """The dataset's damaged parts: missing, with a footer that does not read, or holding
        another number of rows than committed. With `read_rows`, also every
        image is read and hashed against its row's sha256, which costs a full read of the dataset."""
        damaged = []
        for entry in self.manifest()["files"]:
            path = self.location.file(entry["path"])
            try:
                problem = self._part_problem(path, entry["rows"], read_rows)
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, TRANSIENT_ERRORS):
                    raise
                problem = f"does not read: {_first_line(exc)}"
            if problem:
                damaged.append(DamagedPart(path, entry["version"], problem))
        return damaged

    def _part_problem(self, path: Path | str, committed_rows: int, read_rows: bool) -> str | None:
        parquet = pq.ParquetFile(path, filesystem=self.filesystem)
        if parquet.metadata.num_rows != committed_rows:
            return f"holds {parquet.metadata.num_rows} rows where {committed_rows} were committed"
        if not read_rows:
            return None
        mismatched, row = [], 0
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["sha256", "image", "member_path"])
            for sha, image, member in zip(*(table.column(c).to_pylist() for c in table.column_names)):
                if hashlib.sha256(image).hexdigest() != sha:
                    mismatched.append(f"row {row} ({member})")
                row += 1
        if not mismatched:
            return None
        shown = ", ".join(mismatched[:5]) + (", ..." if len(mismatched) > 5 else "")
        return f"{len(mismatched)} of {row} rows hold an image that does not hash to their sha256: {shown}"

    def repair(self, version: int) -> str:
        """How to repair a damaged part of `version`: the parts of a version are written once, so
        it is restored, or dropped whole and its source ingested again for what it held."""
        source = next(v["source_uri"] for v in self.manifest()["versions"] if v["version"] == version)
        return (f"restore it from a backup, or move {self.location.file(f'v{version:06d}')} out of the dataset "
                f"and run `cnnpipe ingest {source} --dataset {self.name}` to add back what that version held")

    def damaged_part_error(self, path: Path | str, problem: str) -> CnnpipeError:
        """The one-line error of a reader that met a damaged part."""
        version = int(Path(str(path)).parent.name.removeprefix("v"))
        return CnnpipeError(f"{path}: {problem}; {self.repair(version)} "
                            f"(`cnnpipe datasets verify {self.name}` checks every part)")

    @contextmanager
    def _reading(self, path: Path | str) -> Iterator[None]:
        try:
            yield
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                raise
            raise self.damaged_part_error(path, f"does not read: {_first_line(exc)}") from None

    def rejected(self) -> list[dict]:
        return self.location.read_json("rejected.json") or []

    def local_copy(self) -> Path:
        """A local folder with this dataset's manifest and parts, for training to read: the
        store itself when local, else a cache under the home that fetches only the parts it
        lacks (a committed part never changes)."""
        if isinstance(self.location, Folder):
            # Training reads manifest.json through cnn.layout: a damaged or lagging one is rebuilt first.
            if not self._lists_every_version(self._stored_manifest()):
                self.location.write_json("manifest.json", self._derive_manifest())
            return self.location.path
        target = self.settings.dataset_cache_dir / self.name
        manifest = self.manifest()
        for entry in manifest["files"]:
            local = target / entry["path"]
            if local.exists() and _rows_in(local) == entry["rows"]:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".tmp")
            self.filesystem.get_file(self.location.file(entry["path"]), str(partial))
            os.replace(partial, local)
        atomic_write_json(target / "manifest.json", manifest)
        return target

    # ---- writing -------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per dataset; a second ingest waits, then finds nothing left to add."""
        with file_lock(self.settings.locks_dir / f"dataset-{self.name}.lock",
                       waiting=f"waiting for another writer of dataset {self.name}"):
            yield

    def recover(self) -> None:
        """Finish what a killed run left: rebuild a lagging manifest, drop half-written files."""
        self.location.discard_debris()
        manifest = self._stored_manifest()
        if self.location.versions() and not self._lists_every_version(manifest):
            log.warning("dataset %s: the manifest did not list its versions; rebuilt it", self.name)
            self.location.write_json("manifest.json", self._derive_manifest())
        for directory in [self.staging, *self.shards_staging.glob("*/shard-*")]:
            self._keep_if_current(directory)

    def _keep_if_current(self, staging: Path) -> None:
        """Staged parts survive only while the version they were staged on is still the latest."""
        if not staging.exists():
            return
        base = staging / "base.json"
        if not base.exists() or json.loads(base.read_text())["base_version"] != self._latest_version():
            shutil.rmtree(staging)
        else:
            for tmp in staging.glob("*.tmp"):
                tmp.unlink()

    def stage(self, source: Source, options: IngestOptions,
              on_progress: Callable[[int, int | None], None] | None = None,
              staging: Path | None = None) -> StagedRun:
        """Read, hash, deduplicate and validate `source` into staged parts. Call under `lock()`."""
        staging = staging or self.staging
        options = resolve_options(source, options)
        base_version = self._latest_version()
        run = StagedRun(self.name, source.uri, base_version, time.time(),
                        val_from_train=options.val_fraction if options.carve_val_from_train else 0.0)
        staging.mkdir(parents=True, exist_ok=True)
        atomic_write_json(staging / "base.json", {"base_version": base_version})
        known = self._known_images(run, staging)
        # Images still being validated, with the paths of identical copies seen meanwhile:
        # those copies share the verdict, a duplicate if kept or the same reason if not.
        waiting: dict[str, list[str]] = {}
        added: defaultdict[str, Counter] = defaultdict(Counter)
        ingested_at = datetime.now(timezone.utc)
        next_index = 1 + max((int(p.name[5:10]) for p in staging.glob("part-*.parquet")), default=-1)
        writer = _PartWriter(staging, next_index)
        done = 0

        def accept(results: Iterator[tuple[_Pending, CheckedImage | tuple[str, str]]]) -> None:
            kept: list[tuple[_Pending, CheckedImage]] = []
            for item, result in results:
                copies = waiting.pop(item.sha256)
                if isinstance(result, tuple):
                    known.remove(item.sha256)
                    for path in [item.entry.path, *copies]:
                        self._reject(run, path, *result)
                else:
                    run.duplicates += len(copies)
                    kept.append((item, result))
            if not kept:
                return
            writer.add({
                "sha256": [item.sha256 for item, _ in kept],
                "image": [item.entry.data if r.encoded is None else r.encoded for item, r in kept],
                "format": [r.format for _, r in kept],
                "width": [r.width for _, r in kept],
                "height": [r.height for _, r in kept],
                "n_frames": [r.n_frames for _, r in kept],
                "label": [item.label for item, _ in kept],
                "split": [item.split for item, _ in kept],
                "source_uri": [source.uri] * len(kept),
                "member_path": [item.entry.path for item, _ in kept],
                "ingested_at": [ingested_at] * len(kept),
            })
            for item, _ in kept:
                added[item.split][item.label] += 1
            for item, _ in kept:
                run.add_content(item.sha256)
            run.rows += len(kept)

        chunk: list[_Pending] = []
        try:
            with _Validator(options.resize, options.workers) as validator:
                for entry in source.entries():
                    done += 1
                    item = self._admit(entry, source.unlabelled, run, known, waiting, options)
                    if item is not None:
                        chunk.append(item)
                    if len(chunk) >= VALIDATION_CHUNK:
                        accept(validator.submit(chunk))
                        chunk = []
                    if on_progress and done % 64 == 0:
                        on_progress(done, source.total)
                accept(validator.submit(chunk))
                accept(validator.drain())
            writer.close()
        except OSError as exc:
            if exc.errno in (28, 27):  # ENOSPC, EFBIG
                raise CnnpipeError(f"disk full while writing {writer.tmp_path or staging}: {exc.strerror}") from exc
            raise
        if on_progress:
            on_progress(done, source.total)
        run.hidden_skipped = source.hidden_skipped
        for split, labels in added.items():
            for label, count in labels.items():
                run.add_count(split, label, count)
        return run

    # ---- sharded ingestion (one writer, many stagers) ------------------------------

    def shard_staging(self, source_uri: str, count: int) -> Path:
        # The same source and shard count find the same folders again after a crash.
        key = hashlib.sha256(f"{source_uri}\0{count}".encode()).hexdigest()[:16]
        return self.shards_staging / key

    def stage_shard(self, source: Source, options: IngestOptions, index: int, count: int) -> StagedRun:
        """Stage shard `index` of `count` of `source`, committing nothing. A shard that
        finished before a crash is not read again; one that died midway adopts its parts."""
        directory = self.shard_staging(source.uri, count) / f"shard-{index:05d}"
        self._keep_if_current(directory)
        finished = directory / "staged.json"
        if finished.exists():
            return StagedRun.from_json(json.loads(finished.read_text()))
        # Every shard must take the whole source's decision: callers should pass it resolved.
        options = resolve_options(source, options)
        run = self.stage(source.sharded(index, count), options, staging=directory)
        atomic_write_json(finished, run.to_json())
        return run

    def merge_shards(self, shards: list[StagedRun], count: int) -> StagedRun:
        """Join the shards' staged parts into `next/`, as one run would have staged them.
        Shards split a source by path, so identical images can reach two of them: the
        first shard keeps it and later copies count as duplicates, or conflicts when their
        label or split differ, as in one run. Call under `lock()`."""
        source_uri = shards[0].source_uri
        base_version = self._latest_version()
        if any(shard.base_version != base_version for shard in shards):
            raise CnnpipeError(f"dataset {self.name} gained a version while {source_uri} was staging; rerun")
        merged = StagedRun(self.name, source_uri, base_version, min(shard.started_at for shard in shards),
                           duplicates=sum(shard.duplicates for shard in shards),
                           rejected=[reject for shard in shards for reject in shard.rejected],
                           val_from_train=max(shard.val_from_train for shard in shards),
                           hidden_skipped=sum(shard.hidden_skipped for shard in shards))
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        atomic_write_json(self.staging / "base.json", {"base_version": base_version})
        seen = _ImageIndex()
        parts = sorted(self.shard_staging(source_uri, count).glob("shard-*/part-*.parquet"))
        for index, part in enumerate(parts):
            keys = pq.read_table(part, columns=["sha256", "label", "split", "member_path"])
            keep = []
            for row, (sha, label, split, path) in enumerate(zip(*(column.to_pylist() for column in keys.columns))):
                stored = seen.get(sha)
                if stored is None:
                    seen.add(sha, label, split)
                    keep.append(row)
                    merged.add_content(sha)
                    merged.add_count(split, label)
                elif stored == (label, split):
                    merged.duplicates += 1
                else:
                    self._reject(merged, path, "conflict",
                                 f"identical image already stored as label {stored[0]!r} in split {stored[1]!r}")
            merged.rows += len(keep)
            target = self.staging / f"part-{index:05d}.parquet"
            if len(keep) == keys.num_rows:
                os.link(part, target)  # the same file, not a copy: staging is one filesystem
            elif keep:
                partial = target.with_name(target.name + ".tmp")
                pq.write_table(pq.read_table(part).take(keep), partial, row_group_size=ROW_GROUP_ROWS,
                               **PARQUET_OPTIONS)
                fsync_file(partial)
                os.replace(partial, target)
        fsync_dir(self.staging)
        return merged

    def commit(self, run: StagedRun) -> IngestSummary:
        """Publish the staged parts as the next version, in one rename. Call under `lock()`."""
        version = run.base_version
        if run.rows + run.adopted_rows > 0:
            version = run.base_version + 1
            previous_id = self.manifest()["version_id"] if run.base_version else ""
            digest = hashlib.sha256(previous_id.encode() + run.content_sum.to_bytes(32, "big"))
            parts = sorted(self.staging.glob("part-*.parquet"))
            (self.staging / "base.json").unlink()
            atomic_write_json(self.staging / "version.json", {
                "version": version,
                "version_id": digest.hexdigest()[:16],
                "created_at": _iso(time.time()),
                "source_uri": run.source_uri,
                "rows": run.rows + run.adopted_rows,
                "counts": run.added_counts,
                "files": [{"path": p.name, "rows": pq.read_metadata(p).num_rows} for p in parts],
            })
            self.location.publish(self.staging, f"v{version:06d}")
            failpoint("store.before_manifest")
            self.location.write_json("manifest.json", self._derive_manifest())
        elif self.staging.exists():
            shutil.rmtree(self.staging)
        # Shards staged on the version just replaced; they are committed or stale now.
        shutil.rmtree(self.shards_staging, ignore_errors=True)
        self._record_rejects(run)
        manifest = self.manifest() if self.exists() else _empty_manifest(self.name)
        return IngestSummary(
            dataset=self.name, source_uri=run.source_uri, version=version,
            version_id=manifest["version_id"], added=run.rows + run.adopted_rows,
            duplicates=run.duplicates, rejected=run.rejected, added_counts=run.added_counts,
            counts=manifest["counts"], total_rows=manifest["num_rows"],
            seconds=time.time() - run.started_at, val_from_train=run.val_from_train,
            hidden_skipped=run.hidden_skipped,
        )

    # ---- internals -----------------------------------------------------------------

    def _admit(self, entry: Entry, unlabelled: str, run: StagedRun, known: _ImageIndex,
               waiting: dict[str, list[str]], options: IngestOptions) -> _Pending | None:
        if entry.reject_reason:
            self._reject(run, entry.path, entry.reject_reason, entry.reject_detail)
            return None
        if entry.label is None:
            self._reject(run, entry.path, "no_label", unlabelled)
            return None
        sha = hashlib.sha256(entry.data).hexdigest()
        if entry.expected_sha256 and entry.expected_sha256 != sha:
            self._reject(run, entry.path, "checksum_mismatch",
                         f"manifest says sha256 {entry.expected_sha256[:12]}…, bytes hash to {sha[:12]}…")
            return None
        carved = entry.split == "train" and options.carve_val_from_train
        if carved:
            split = split_for_train(sha, options.val_fraction, options.test_fraction)
        else:
            split = entry.split or split_for(sha, options.val_fraction, options.test_fraction)
        stored = known.get(sha)
        if stored is None:
            known.add(sha, entry.label, split)
            waiting[sha] = []
            return _Pending(entry, sha, entry.label, split)
        # A carved train/ image already stored in train or val (say, before carving existed,
        # or with another --val-fraction) stays where it is: a duplicate, not a conflict.
        if stored == (entry.label, split) or (carved and stored in ((entry.label, "train"), (entry.label, "val"))):
            if sha in waiting:
                waiting[sha].append(entry.path)
            else:
                run.duplicates += 1
        else:
            self._reject(run, entry.path, "conflict",
                         f"identical image already stored as label {stored[0]!r} in split {stored[1]!r}")
        return None

    def _reject(self, run: StagedRun, path: str, reason: str, detail: str) -> None:
        reject = Reject(path, reason, detail)
        run.rejected.append(reject)
        log.warning("rejected %s", reject.line(run.source_uri))

    def _known_images(self, run: StagedRun, staging: Path) -> _ImageIndex:
        known = _ImageIndex()
        stored = self.read_table(["sha256", "label", "split"]) if self.exists() else None
        adopted = [pq.read_table(p, columns=["sha256", "label", "split"])
                   for p in sorted(staging.glob("part-*.parquet"))]
        for table in ([stored] if stored is not None else []) + adopted:
            for sha, label, split in zip(*(table.column(c).to_pylist() for c in ("sha256", "label", "split"))):
                known.add(sha, label, split)
        for table in adopted:
            run.adopted_rows += table.num_rows
            for sha in table.column("sha256").to_pylist():
                run.add_content(sha)
            labels, splits = table.column("label").to_pylist(), table.column("split").to_pylist()
            for label, split in zip(labels, splits):
                run.add_count(split, label)
        if run.adopted_rows:
            log.info("resuming: %d images were already staged by an interrupted run", run.adopted_rows)
        return known

    def _record_rejects(self, run: StagedRun) -> None:
        if not run.rejected:
            return
        now = _iso(time.time())
        merged = {(r["source_uri"], r["path"]): r for r in self.rejected()}
        for reject in run.rejected:
            merged[(run.source_uri, reject.path)] = {"source_uri": run.source_uri, **asdict(reject), "at": now}
        self.location.write_json("rejected.json", sorted(merged.values(), key=lambda r: (r["source_uri"], r["path"])))

    def _latest_version(self) -> int:
        versions = self.location.versions()
        return int(versions[-1][1:]) if versions else 0

    def _derive_manifest(self) -> dict:
        manifest = _empty_manifest(self.name)
        counts: defaultdict[str, Counter] = defaultdict(Counter)
        for directory in self.location.versions():
            info = self.location.read_json(f"{directory}/version.json")
            manifest["files"] += [{"path": f"{directory}/{f['path']}", "rows": f["rows"], "version": info["version"]}
                                  for f in info["files"]]
            manifest["versions"].append({k: info[k] for k in ("version", "version_id", "created_at", "source_uri", "rows")})
            for split, labels in info["counts"].items():
                counts[split].update(labels)
            manifest["version"], manifest["version_id"] = info["version"], info["version_id"]
        manifest["counts"] = {split: dict(sorted(labels.items())) for split, labels in sorted(counts.items())}
        manifest["classes"] = sorted({label for labels in counts.values() for label in labels})
        manifest["num_rows"] = sum(f["rows"] for f in manifest["files"])
        return manifest


def _empty_manifest(name: str) -> dict:
    return {"format": FORMAT, "name": name, "version": 0, "version_id": "", "classes": [],
            "counts": {}, "num_rows": 0, "files": [], "versions": []}


def list_datasets(settings: Settings | None = None) -> list[dict]:
    settings = settings or get_settings()
    names = location(settings.datasets_url).children()
    stores = [DatasetStore(name, settings) for name in names if _NAME.match(name)]
    manifests = []
    for store in stores:
        try:
            if store.exists():
                manifests.append(store.manifest())
        except CnnpipeError as exc:
            # One damaged dataset must not hide the others.
            log.warning("dataset %s is left out of the list: %s", store.name, exc)
    return manifests


def _rows_in(part: Path) -> int | None:
    """A local part's row count from its footer; None when it does not read, to fetch it again."""
    try:
        return pq.read_metadata(part).num_rows
    except (pa.ArrowException, OSError):
        return None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


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
            with self.store._reading(path):
                parquet = pq.ParquetFile(path, filesystem=self.store.filesystem)
            for group in range(parquet.num_row_groups):
                if not self._mine(f"{path}:{group}"):
                    continue
                with self.store._reading(path):
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
