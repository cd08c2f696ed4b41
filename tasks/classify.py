"""Thin Prefect tasks over bulk classification."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cnn.predict import Predictor
from cnnpipe.classify import ClassifySummary, classify_source, open_classify_source
from cnnpipe.progress import progress_bar
from cnnpipe.registry import load_predictor
from cnnpipe.reports import classify_markdown
from cnnpipe.settings import get_settings


# Each run classifies what is new in its source: nothing here is worth caching.
@task(name="classify-images", cache_policy=NO_CACHE)
def classify_images(source: str, model: str, checkpoint: str | None, device: str, batch_size: int,
                    run_id: str) -> ClassifySummary:
    settings = get_settings()
    # Resolved once per run: an alias that moves mid-run does not mix versions in the rows.
    predictor = Predictor(checkpoint, device, batch_size) if checkpoint else load_predictor(model, device, batch_size)
    with progress_bar("classify") as update:
        return classify_source(open_classify_source(source), predictor, settings.predictions_db, settings.staging_dir,
                               run_id, on_progress=update)


@task(name="report-classify", cache_policy=NO_CACHE)
def report_classify(summary: ClassifySummary) -> ClassifySummary:
    create_markdown_artifact(classify_markdown(summary), key="classify-summary",
                             description=f"Classification of {summary.source_uri}")
    return summary
