"""Thin Prefect tasks over the dataset store."""

from __future__ import annotations

from dataclasses import replace

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from cnnpipe.errors import CnnpipeError
from cnnpipe.reports.markdown import ingest_markdown
from cnnpipe.reports.progress import progress_bar
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions, IngestSummary, StagedRun
from tasks.retry import is_transient_io_error


@task(name="recover-dataset")
def recover_dataset(dataset: str) -> None:
    DatasetStore(dataset).recover()


# A retry re-reads the source but adopts the parts the failed attempt already staged.
@task(name="stage-images", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient_io_error)
def stage_images(source: str, dataset: str, options: IngestOptions) -> StagedRun:
    opened = open_source(source)
    with progress_bar(f"ingest {dataset}") as update:
        return DatasetStore(dataset).stage(opened, options, on_progress=update)


# On a cluster, Ray's parallelism replaces the local pool: one decoding process per shard
# still isolates decoder crashes and hangs from the shard.
@task(name="stage-shard", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient_io_error)
def stage_shard(source: str, dataset: str, options: IngestOptions, index: int, count: int) -> StagedRun:
    if options.workers is None:
        options = replace(options, workers=1)
    return DatasetStore(dataset).stage_shard(open_source(source), options, index, count)


# A relabel reads the manifest and the parts it copies again on a retry, keeping the copies made.
@task(name="stage-relabel", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient_io_error)
def stage_relabel(source: str, dataset: str, new_classes: tuple[str, ...] = ()) -> StagedRun:
    opened = open_source(source)
    with progress_bar(f"relabel {dataset}") as update:
        return DatasetStore(dataset).stage_relabel(opened, new_classes, on_progress=update)


@task(name="merge-shards")
def merge_shards(dataset: str, shards: list[StagedRun]) -> StagedRun:
    return DatasetStore(dataset).merge_shards(shards, len(shards))


@task(name="commit-version")
def commit_version(staged: StagedRun) -> IngestSummary:
    return DatasetStore(staged.dataset).commit(staged)


# Only when the dataset has a version whose labels are not in yet, so a rerun costs one query.
@task(name="record-labels", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient_io_error)
def record_labels(dataset: str) -> int:
    """Write the labels of the dataset's current version into the predictions database, where
    `production_accuracy` scores predictions of the same images, and what its relabel versions
    changed into `label_changes`; returns how many labels were written."""
    store = DatasetStore(dataset)
    if not store.exists():
        return 0
    # DuckDB only now: an ingest that stored nothing never opens the predictions database.
    from cnnpipe.predictions.database import record_label_changes
    from cnnpipe.predictions.records import labelled_version, record_ground_truth

    database, version_id = get_settings().predictions_db, store.manifest()["version_id"]
    try:
        if labelled_version(database, dataset) == version_id:
            return 0
        # Before the labels: a run stopped between the two finds the version unlabelled and does both.
        record_label_changes(database, store.label_changes())
        return record_ground_truth(database, dataset, version_id, store.read_table(["sha256", "label"]))
    except CnnpipeError as exc:  # e.g. a long query holds the database: the images themselves are in
        get_run_logger().warning("%s; the labels of %s are recorded by the next ingest into it", exc, dataset)
        return 0


@task(name="report-ingest")
def report_ingest(summary: IngestSummary, max_reject_fraction: float) -> IngestSummary:
    report = ingest_markdown(summary) + "".join(f"{line}\n" for line in summary.relabel_lines())
    create_markdown_artifact(report, key=f"ingest-{_artifact_key(summary.dataset)}",
                             description=f"Ingest of {summary.source_uri} into {summary.dataset}")
    seen = summary.added + summary.duplicates + len(summary.rejected) + len(summary.relabelled) + len(summary.skipped)
    if seen and len(summary.rejected) / seen > max_reject_fraction:
        kept = f"the {len(summary.relabelled)} relabels were made" if summary.relabelled else \
            f"the {summary.added} good images were kept"
        raise CnnpipeError(
            f"{summary.source_uri}: {len(summary.rejected)} of {seen} files rejected, over the "
            f"{max_reject_fraction:.0%} limit; {kept}")
    return summary


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
