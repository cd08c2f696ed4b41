"""Bulk classification of a source into the predictions database.

Images are hashed first and those this model version already classified are skipped
before decoding. The rest are validated and normalised exactly as ingestion does
(`check_image`), decoded in a thread pool (one thread per core) and classified in
batches, while a background thread reads and hashes the next ones. Predictions are
committed a part at a time (PART_ROWS images, then twice as many each time up to MAX_PART_ROWS),
each in one short transaction with `ON CONFLICT DO NOTHING`, so a killed run keeps every part
it committed and a rerun adds each image exactly once. A part that cannot commit, and every
part of one shard of a distributed run, is staged as Parquet (written aside, then renamed) for
a later commit.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cnn.decoding import DECODE_THREADS, decode_images
from cnnpipe.base.arrow_rows import lists, numbers, repeated, strings, taken, timestamps
from cnnpipe.base.locks import file_lock
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import connect, retry_on_lock, transaction
from cnnpipe.predictions.records import add_predictions, reference_temperature
from cnnpipe.sources import Source, open_source
from cnnpipe.sources.images import RejectedImage, check_image
from cnnpipe.store import Reject, open_dataset_source

# Each part commits in a transaction of its own, on a thread of its own while the model computes
# the next parts, so a run waits only for its last part's commit; a kill loses at most the parts
# not yet committed, which the rerun classifies again. Parts grow from PART_ROWS to MAX_PART_ROWS: each
# commit costs about 0.1 s whatever its size (opening the file, the commit, the checkpoint on closing), so
# 32,768-row parts cost 0.25 CPU-s per 10,000 predictions against 0.41 for 8,192-row ones, while a short run
# still commits early and waits only for a small last part.
PART_ROWS = 8_192
MAX_PART_ROWS = 32_768
PART_SCHEMA = pa.schema([
    ("image_sha256", pa.string()), ("source_uri", pa.string()), ("member_path", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.string()), ("mlflow_run_id", pa.string()),
    ("label", pa.string()), ("confidence", pa.float64()),
    ("top5", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))),
    ("width", pa.int32()), ("height", pa.int32()), ("classify_run_id", pa.string()),
    ("predicted_at", pa.timestamp("us", tz="UTC")), ("calibrated_confidence", pa.float64()),
    ("brightness", pa.float64()),
    # The model version's view of the image (`cnn.embeddings`), committed into `embeddings` with its prediction.
    ("embedding", pa.list_(pa.float32())),
])
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class ClassifySummary:
    source_uri: str
    model_name: str
    model_version: str
    run_id: str
    classified: int = 0
    skipped: int = 0
    rejected: list[Reject] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # How long the run waited for its commits, and how long they took on the thread that makes them.
    commit_seconds: float = 0.0
    commit_work_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.classified / self.seconds if self.seconds else 0.0


def open_classify_source(uri: str) -> Source:
    """What `cnnpipe classify` reads: any ingest source, or a dataset of the store (`dataset:NAME[/SPLIT]`)."""
    if uri.startswith("dataset:"):
        return open_dataset_source(uri)
    return open_source(uri)


def committing(staging_root: Path, database: Path):
    """Runs that commit into `database` take turns: a scheduled run that starts while the
    last one is still going waits for it, then finds its images already classified."""
    return file_lock(staging_root / "classify.lock", waiting=f"another run is classifying into {database}; waiting")


def commit_shards(database: Path, staging_root: Path, shards: list[ClassifySummary], seconds: float) -> ClassifySummary:
    """The one committer of a distributed run: commit every staged part, then record one run."""
    first = shards[0]
    summary = ClassifySummary(first.source_uri, first.model_name, first.model_version, first.run_id, seconds=seconds)
    commit_started = time.perf_counter()
    with committing(staging_root, database):
        summary.classified = commit_parts(database, staging_root / "classify")
    summary.commit_seconds = summary.commit_work_seconds = time.perf_counter() - commit_started
    counts: Counter[str] = Counter()
    for shard in shards:
        summary.skipped += shard.skipped
        summary.rejected += shard.rejected
        counts.update(shard.class_counts)
    summary.class_counts = dict(counts.most_common())
    record_run(database, summary)
    return summary


def already_classified(database: Path, model_name: str, model_version: str) -> set[str]:
    if not database.exists():
        return set()

    def read() -> set[str]:
        with connect(database, read_only=True) as connection:
            rows = connection.execute("SELECT image_sha256 FROM predictions WHERE model_name = ? AND model_version = ?",
                                      [model_name, model_version]).fetchall()
        return {sha for (sha,) in rows}

    return retry_on_lock(read, database)


def commit_parts(database: Path, staging: Path) -> int:
    """Insert every staged part into DuckDB, one short transaction each, then drop the part."""
    inserted = 0
    for part in sorted(staging.glob("*.parquet")) if staging.exists() else []:
        try:
            with transaction(database) as connection:
                inserted += add_predictions(connection, "SELECT * FROM read_parquet(?)", [str(part)])
        except CnnpipeError as exc:
            raise CnnpipeError(f"{exc}; {part} stays staged and the next run commits it") from exc
        part.unlink()
    return inserted


def write_part(part: pa.Table, path: Path) -> None:
    """Written aside, then renamed: a part on disk is always whole."""
    partial = path.with_name(path.name + ".tmp")
    pq.write_table(part, partial)
    os.replace(partial, path)


def commit_part(database: Path, part: pa.Table, path: Path) -> None:
    """Commit a part from memory. Only a part that cannot commit (the file held past the retries,
    a full disk) is staged at `path`, for the next run to commit rather than classify again: a
    run killed before its commit loses predictions that the rerun makes again, and writing every
    part out and reading it back added a quarter to the cost of its commit."""
    try:
        with transaction(database) as connection:
            connection.register("part", part)
            add_predictions(connection, "SELECT * FROM part")
    except CnnpipeError as exc:
        try:
            write_part(part, path)
        except OSError as staging_failed:
            raise CnnpipeError(f"{exc}; staging the part at {path} failed too ({staging_failed}), "
                               "and the next run classifies its images again") from exc
        raise CnnpipeError(f"{exc}; {path} stays staged and the next run commits it") from exc


def _timed(action: Callable, *arguments) -> float:
    started = time.perf_counter()
    action(*arguments)
    return time.perf_counter() - started


def classify_source(source: Source, predictor, database: Path, staging_root: Path, run_id: str,
                    on_progress: Callable[[int, int | None], None] | None = None,
                    commit: bool = True) -> ClassifySummary:
    """Classify what is new in `source` into `database`, a staged Parquet part at a time.

    With `commit=False` (one shard of a distributed run) parts are only staged, under names
    of their own; the run's single committer then calls `commit_shards`.
    """
    with committing(staging_root, database) if commit else nullcontext():
        return _classify(source, predictor, database, staging_root, run_id, on_progress, commit)


def _classify(source: Source, predictor, database: Path, staging_root: Path, run_id: str,
              on_progress: Callable[[int, int | None], None] | None, commit: bool) -> ClassifySummary:
    summary = ClassifySummary(source.uri, predictor.name, predictor.version, run_id)
    staging = staging_root / "classify"
    staging.mkdir(parents=True, exist_ok=True)
    prefix = f"{run_id}-s{source.shard[0]:03d}" if source.shard else run_id
    # Other shards may be writing beside us: only our own leftovers are stale.
    for stale in staging.glob("*.tmp" if commit else f"{prefix}-*.tmp"):
        stale.unlink()
    started = time.perf_counter()
    if commit:
        commit_parts(database, staging)  # what a killed run staged but did not commit
    done = already_classified(database, predictor.name, predictor.version)
    predictor.temperature = reference_temperature(database, predictor.name, predictor.version)
    batches: queue.Queue = queue.Queue(maxsize=2)
    counts = np.zeros(len(predictor.classes), np.int64)
    staged: list[pa.RecordBatch] = []
    part_index = 0
    part_rows = PartRows(source.uri, predictor, run_id)

    def produce() -> None:
        try:
            for batch in _prepared_batches(source, done, summary, predictor.decode_size, predictor.batch_size,
                                           on_progress, pin=predictor.device.type == "cuda", fit=predictor.resize):
                batches.put(batch)
            batches.put(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            batches.put(exc)

    committer = ThreadPoolExecutor(1, thread_name_prefix="cnnpipe-classify-commit")
    committing_part: Future | None = None

    def wait_for_commit() -> None:
        nonlocal committing_part
        if committing_part is not None:
            waited = time.perf_counter()
            done, committing_part = committing_part, None
            summary.commit_work_seconds += done.result()
            summary.commit_seconds += time.perf_counter() - waited

    def stage_and_commit() -> None:
        nonlocal part_index, committing_part
        part = pa.Table.from_batches(staged, PART_SCHEMA)
        path = staging / f"{prefix}-{part_index:05d}.parquet"
        part_index += 1
        staged.clear()
        if not commit:
            write_part(part, path)
            return
        # One part commits while the model computes the next ones; parts commit in order, one at a time.
        wait_for_commit()
        committing_part = committer.submit(_timed, commit_part, database, part, path)

    def add_rows(items: list[tuple], top) -> None:
        arrays = top.arrays()
        staged.append(part_rows.batch(items, *arrays))
        counts[:] += np.bincount(arrays[1][:, 0], minlength=len(counts))
        summary.classified += len(items)
        if sum(len(batch) for batch in staged) >= min(PART_ROWS << part_index, MAX_PART_ROWS):
            stage_and_commit()

    threading.Thread(target=produce, name="cnnpipe-classify-read", daemon=True).start()
    # Each batch's rows are written while the device computes the next one.
    previous = None
    try:
        while (batch := batches.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            items, images = batch
            top = predictor.top_k(images, 5)
            if previous is not None:
                add_rows(*previous)
            previous = (items, top)
        if previous is not None:
            add_rows(*previous)
    except BaseException:
        committer.shutdown()  # the part on its way commits, or is staged, before the error goes up
        raise
    try:
        if staged:
            stage_and_commit()
        wait_for_commit()
    finally:
        committer.shutdown()
    summary.seconds = time.perf_counter() - started
    summary.class_counts = dict(Counter({label: int(count) for label, count in zip(predictor.classes, counts)
                                         if count}).most_common())
    if commit:
        record_run(database, summary)
    return summary


class PartRows:
    """The rows of a part, a batch of the model's output arrays at a time (`PART_SCHEMA`)."""

    def __init__(self, source_uri: str, predictor, run_id: str):
        self.classes = strings(predictor.classes)
        self.constants = {"source_uri": source_uri, "model_name": predictor.name,
                          "model_version": predictor.version, "mlflow_run_id": predictor.run_id,
                          "classify_run_id": run_id}

    def batch(self, items: list[tuple], values: np.ndarray, indices: np.ndarray, calibrated: np.ndarray,
              brightness: np.ndarray, embeddings: np.ndarray) -> pa.RecordBatch:
        """`items` (sha256, path, width, height) with their top-k `values` and class `indices`,
        calibrated confidences (NaN: none), brightnesses and embeddings (none if 0 wide)."""
        count, k = indices.shape
        shas, paths, widths, heights = zip(*items)
        now = (datetime.now(timezone.utc) - _EPOCH) // timedelta(microseconds=1)
        columns = {name: repeated(value, count) for name, value in self.constants.items()}
        top5 = pa.StructArray.from_arrays([taken(self.classes, indices), numbers(values.reshape(-1), pa.float64())],
                                          fields=list(PART_SCHEMA.field("top5").type.value_type))
        columns.update(
            image_sha256=strings(list(shas)), member_path=strings(list(paths)), label=taken(self.classes, indices[:, 0]),
            confidence=numbers(values[:, 0], pa.float64()), top5=lists(top5, k, PART_SCHEMA.field("top5").type),
            width=numbers(np.array(widths), pa.int32()), height=numbers(np.array(heights), pa.int32()),
            predicted_at=timestamps(np.full(count, now, np.int64)),
            calibrated_confidence=numbers(calibrated, pa.float64(), valid=~np.isnan(calibrated)),
            brightness=numbers(brightness, pa.float64()),
            embedding=lists(numbers(embeddings.reshape(-1), pa.float32()), embeddings.shape[1],
                            PART_SCHEMA.field("embedding").type) if embeddings.shape[1]
            else pa.nulls(count, PART_SCHEMA.field("embedding").type))
        return pa.RecordBatch.from_arrays([columns[name] for name in PART_SCHEMA.names], schema=PART_SCHEMA)


def _prepared_batches(source: Source, done: set[str], summary: ClassifySummary, size: int, batch_size: int,
                      on_progress, pin: bool, fit: str = "crop") -> Iterator[tuple[list[tuple], torch.Tensor]]:
    """Batches of `batch_size` new, valid images; one chunk decodes in the pool while the next is
    read and hashed."""
    pending, decoding, seen = [], None, 0
    items, images = [], []
    # The other paths of the same bytes met while an image is still being checked: skipped as classified
    # if it is, refused by name beside it if it is not.
    copies: dict[str, list[str]] = {}

    def collect(chunk: list[tuple], results: Iterator) -> Iterator[tuple[list[tuple], torch.Tensor]]:
        nonlocal items, images
        for (sha, path, _), result in zip(chunk, results):
            same_bytes = copies.pop(sha, [])
            if isinstance(result, RejectedImage):
                done.discard(sha)
                summary.rejected.extend(Reject(copy, result.reason, result.detail) for copy in [path, *same_bytes])
                summary.skipped -= len(same_bytes)
                continue
            width, height, pixels = result
            items.append((sha, path, width, height))
            images.append(pixels)
            if len(items) == batch_size:
                yield _batch(items, images, pin)
                items, images = [], []

    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="cnnpipe-classify-decode") as pool:
        for entry in source.entries():
            seen += 1
            if on_progress and seen % 64 == 0:
                on_progress(seen, source.total)
            if entry.reject_reason:
                summary.rejected.append(Reject(entry.path, entry.reject_reason, entry.reject_detail))
                continue
            sha = entry.content_sha256 or hashlib.sha256(entry.data).hexdigest()
            if sha in done:
                summary.skipped += 1
                if sha in copies:
                    copies[sha].append(entry.path)
                continue
            done.add(sha)
            copies[sha] = []
            pending.append((sha, entry.path, entry.data))
            if len(pending) == batch_size:
                if decoding is not None:
                    yield from collect(*decoding)
                decoding = pending, _decoded(pool, pending, size, fit)
                pending = []
        if decoding is not None:
            yield from collect(*decoding)
        yield from collect(pending, _decoded(pool, pending, size, fit))
    if items:
        yield _batch(items, images, pin)
    if on_progress:
        on_progress(seen, source.total)


def _decoded(pool: ThreadPoolExecutor, pending: list[tuple], size: int, fit: str) -> Iterator:
    """The checked pixels of `pending` (sha, path, data), in order, decoded in one task a thread: a task
    an image cost more in futures, locks and wake-ups than decoding a 32-px JPEG does."""
    step = max(1, -(-len(pending) // DECODE_THREADS))
    chunks = [pool.submit(_checked_chunk, [data for *_, data in pending[start:start + step]], size, fit)
              for start in range(0, len(pending), step)]
    return (result for chunk in chunks for result in chunk.result())


def _checked_chunk(datas: list[bytes], size: int, fit: str) -> list:
    return [_checked_pixels(data, size, fit) for data in datas]


def _checked_pixels(data: bytes, size: int, fit: str = "crop") -> tuple[int, int, np.ndarray] | RejectedImage:
    """(width, height, uint8 pixels at `size`, height x width x RGB), validated exactly as ingestion does,
    or why not."""
    try:
        checked = check_image(data, keep_pixels=True)
    except RejectedImage as exc:
        return exc
    if checked.pixels is not None and checked.pixels.shape[:2] == (size, size):
        return checked.width, checked.height, checked.pixels  # decoded once
    blob = data if checked.encoded is None else checked.encoded
    return checked.width, checked.height, decode_images([blob], size, fit=fit)[0].permute(1, 2, 0).numpy()


def as_batch(images: list[np.ndarray]) -> torch.Tensor:
    """Height x width x RGB images as one uint8 batch, N x RGB x height x width in channels-last memory:
    one copy, where a tensor an image stacked into NCHW took a copy an image, a transposing one, which
    the model's channels-last input then transposed back."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def _batch(items: list[tuple], images: list[np.ndarray], pin: bool) -> tuple[list[tuple], torch.Tensor]:
    batch = as_batch(images)
    return items, batch.pin_memory() if pin else batch  # pinned: the copy to the GPU need not wait


def record_run(database: Path, summary: ClassifySummary) -> None:
    now = datetime.now(timezone.utc)
    with transaction(database) as connection:
        connection.execute(
            "INSERT OR REPLACE INTO classify_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'completed')",
            [summary.run_id, summary.source_uri, summary.model_name, summary.model_version,
             datetime.fromtimestamp(now.timestamp() - summary.seconds, timezone.utc), now, summary.classified,
             summary.skipped, len(summary.rejected), summary.seconds, summary.images_per_second])
        if summary.rejected:
            connection.executemany("INSERT INTO rejected_inputs VALUES (?, ?, ?, ?, ?, ?)",
                                   [[summary.run_id, summary.source_uri, r.path, r.reason, r.detail, now]
                                    for r in summary.rejected])
