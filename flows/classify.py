from __future__ import annotations

import uuid

from prefect import flow
from prefect.runtime import flow_run

from cnn.train import resolve_device
from cnnpipe.classify import ClassifySummary
from tasks.classify import classify_images, report_classify


@flow(name="classify")
def classify(source: str, checkpoint: str, device: str = "auto", batch_size: int = 256) -> ClassifySummary:
    """Classify every new image of `source` into the predictions database."""
    run_id = flow_run.id or uuid.uuid4().hex
    summary = classify_images(source, checkpoint, str(resolve_device(device)), batch_size, run_id)
    return report_classify(summary)
