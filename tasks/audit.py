"""Thin Prefect tasks of `cnnpipe audit`: audit a dataset, keep what it found, report it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from cnnpipe.errors import CnnpipeError
from cnnpipe.models import tracking
from cnnpipe.models.params import TrainingParams
from cnnpipe.monitoring.audit import AuditFindings, audit_dataset, twin_thumbnails, write_findings
from cnnpipe.reports.markdown import audit_markdown
from cnnpipe.settings import get_settings
from cnnpipe.store import DatasetStore
from cnnpipe.store.twins import stored_images


@task(name="audit-dataset", cache_policy=NO_CACHE)
def audit(dataset: str, folds: int, params: TrainingParams) -> AuditFindings:
    """The twin check, and with folds the K-fold trainings for label issues and outliers."""
    store = DatasetStore(dataset)
    if not store.exists():
        raise CnnpipeError(f"no dataset named {dataset!r}; ingest one with `cnnpipe ingest SOURCE --dataset {dataset}`")
    settings = get_settings()
    config = params.config(str(store.local_copy()), str(settings.checkpoints_dir / "audit"))
    with tempfile.TemporaryDirectory(prefix=f"audit-{dataset}-", dir=settings.home) as work:
        findings = audit_dataset(store, config, folds, Path(work))
    for line in findings.lines():
        get_run_logger().info(line)
    return findings


# A long query can hold the predictions database: the write retries, and the findings are not lost meanwhile.
@task(name="record-audit", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def record_audit(findings: AuditFindings) -> None:
    write_findings(get_settings().predictions_db, findings)


@task(name="report-audit", cache_policy=NO_CACHE)
def report_audit(findings: AuditFindings) -> str:
    """The report as a Prefect artifact and in an MLflow run of its own, with the leak pairs'
    thumbnails beside it; returns the markdown."""
    settings = get_settings()
    folder = settings.reports_dir / "audit" / findings.dataset
    store = DatasetStore(findings.dataset)
    leaks = [t for t in findings.twins.twins if t.leak]
    thumbnails = twin_thumbnails(stored_images(store, {sha for t in leaks[:8] for sha in (t.image_sha256, t.twin_sha256)}),
                                 leaks, folder / "leak_pairs.png") if leaks else None
    markdown = audit_markdown(findings, thumbnails)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audit.md").write_text(markdown)
    create_markdown_artifact(markdown, key="audit-report", description=f"Audit of dataset {findings.dataset}")
    tracking.log_audit(findings.dataset, findings.dataset_version, findings.metrics(), folder)
    return markdown
