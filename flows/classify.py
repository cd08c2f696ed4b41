from __future__ import annotations

import uuid

from prefect import flow
from prefect.runtime import flow_run

from cnn.train import resolve_device
from cnnpipe.classify import ClassifySummary
from cnnpipe.settings import REGISTERED_MODEL
from tasks.classify import classify_images, report_classify


@flow(name="classify")
def classify(source: str, model: str = f"{REGISTERED_MODEL}@champion", checkpoint: str | None = None,
             device: str = "auto", batch_size: int = 256) -> ClassifySummary:
    """Classify every new image of `source` into the predictions database, with a registered
    model (`NAME@ALIAS` or `NAME/VERSION`) or, when given, a checkpoint file."""
    run_id = flow_run.id or uuid.uuid4().hex
    summary = classify_images(source, model, checkpoint, str(resolve_device(device)), batch_size, run_id)
    return report_classify(summary)
