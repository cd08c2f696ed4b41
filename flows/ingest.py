from __future__ import annotations

from prefect import flow

from cnnpipe.store import DatasetStore, IngestOptions, IngestSummary
from tasks.ingest import commit_version, recover_dataset, report_ingest, stage_images


@flow(name="ingest")
def ingest(
    source: str,
    dataset: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    resize: int | None = None,
    workers: int | None = None,
    max_reject_fraction: float = 0.5,
) -> IngestSummary:
    """Add the new images of `source` to `dataset` as one new version."""
    options = IngestOptions(val_fraction, test_fraction, resize, workers)
    # One writer per dataset, held from recovery to commit.
    with DatasetStore(dataset).lock():
        recover_dataset(dataset)
        staged = stage_images(source, dataset, options)
        summary = commit_version(staged)
    return report_ingest(summary, max_reject_fraction)
