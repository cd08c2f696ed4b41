"""Thin Prefect tasks over bulk classification, in one process or sharded over Ray."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from cnn.predict import Predictor
from cnn.device import resolve_device
from cnnpipe.models import refs, registry
from cnnpipe.models.projections import ensure_projection
from cnnpipe.monitoring.drift import run_drift
from cnnpipe.monitoring.drift_picture import drift_distributions
from cnnpipe.monitoring.reference import ensure_reference_profile
from cnnpipe.predictions.classify import ClassifySummary, classify_source, commit_shards, open_classify_source
from cnnpipe.reports.markdown import classify_markdown, drift_markdown
from cnnpipe.reports.progress import progress_bar
from cnnpipe.settings import get_settings


def _predictor(model: str, checkpoint: str | None, device: str, batch_size: int) -> Predictor:
    return Predictor(checkpoint, device, batch_size) if checkpoint else registry.load_predictor(model, device, batch_size)


# Each run classifies what is new in its source: nothing here is worth caching.
@task(name="classify-images", cache_policy=NO_CACHE)
def classify_images(source: str, model: str, checkpoint: str | None, device: str, batch_size: int,
                    run_id: str) -> ClassifySummary:
    settings = get_settings()
    # Resolved once per run: an alias that moves mid-run does not mix versions in the rows.
    predictor = _predictor(model, checkpoint, device, batch_size)
    if not checkpoint:  # what its drift and embeddings are measured with, derived once for a version that predates them
        ensure_reference_profile(predictor.name, predictor.version, settings, device)
        ensure_projection(predictor, settings, device)
    with progress_bar("classify") as update:
        return classify_source(open_classify_source(source), predictor, settings.predictions_db, settings.staging_dir,
                               run_id, on_progress=update)


@task(name="pin-model", retries=2, retry_delay_seconds=5)
def pin_model(model: str) -> str:
    """`NAME/VERSION` for a reference, so that every shard loads the same version."""
    version = registry.resolve(registry.client(), refs.parse_model_ref(model))
    return f"{version.name}/{version.version}"


@task(name="classify-shard", cache_policy=NO_CACHE)
def classify_shard(source: str, model: str, checkpoint: str | None, device: str, batch_size: int, run_id: str,
                   index: int, count: int) -> ClassifySummary:
    """One shard of a distributed run: classify, stage Parquet parts, commit nothing."""
    settings = get_settings()
    return classify_source(open_classify_source(source).sharded(index, count),
                           _predictor(model, checkpoint, str(resolve_device(device)), batch_size), settings.predictions_db,
                           settings.staging_dir, run_id, commit=False)


@task(name="commit-shards", cache_policy=NO_CACHE)
def commit_classified(shards: list[ClassifySummary], seconds: float) -> ClassifySummary:
    settings = get_settings()
    return commit_shards(settings.predictions_db, settings.staging_dir, shards, seconds)


@task(name="report-classify", cache_policy=NO_CACHE)
def report_classify(summary: ClassifySummary) -> ClassifySummary:
    create_markdown_artifact(classify_markdown(summary), key="classify-summary",
                             description=f"Classification of {summary.source_uri}")
    return summary


@task(name="monitor-drift", cache_policy=NO_CACHE)
def monitor_drift(summary: ClassifySummary) -> dict | None:
    """The run's drift against its model's reference: a Prefect artifact, and on an alert the event
    `cnnpipe.model.drift`, which a deployment trigger can turn into a retraining."""
    settings = get_settings()
    drift = run_drift(settings.predictions_db, summary.run_id)
    if drift is None:
        return None
    picture = drift_distributions(drift["distributions"], f"{drift['model_name']}/{drift['model_version']}, "
                                  f"{drift['images']:,} images", settings.reports_dir / "drift" / f"{summary.run_id}.png")
    create_markdown_artifact(drift_markdown(drift, picture), key="classify-drift",
                             description=f"Drift of {summary.model_name}/{summary.model_version}")
    if drift["alert"]:
        emit_event(event="cnnpipe.model.drift",
                   resource={"prefect.resource.id": f"cnnpipe.model.{drift['model_name']}.{drift['model_version']}",
                             "prefect.resource.name": drift["model_name"], "version": str(drift["model_version"])},
                   payload={key: value for key, value in drift.items() if isinstance(value, (int, float, str, bool))})
    return drift
