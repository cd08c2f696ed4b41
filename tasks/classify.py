"""Thin Prefect tasks over bulk classification."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cnn.predict import Predictor
from cnnpipe.classify import ClassifySummary, classify_source
from cnnpipe.progress import progress_bar
from cnnpipe.reports import classify_markdown
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source


# Each run classifies what is new in its source: nothing here is worth caching.
@task(name="classify-images", cache_policy=NO_CACHE)
def classify_images(source: str, checkpoint: str, device: str, batch_size: int, run_id: str) -> ClassifySummary:
    settings = get_settings()
    predictor = Predictor(checkpoint, device, batch_size)  # resolved once per run
    with progress_bar("classify") as update:
        return classify_source(open_source(source), predictor, settings.predictions_db, settings.staging_dir,
                               run_id, on_progress=update)


@task(name="report-classify", cache_policy=NO_CACHE)
def report_classify(summary: ClassifySummary) -> ClassifySummary:
    create_markdown_artifact(classify_markdown(summary), key="classify-summary",
                             description=f"Classification of {summary.source_uri}")
    return summary
