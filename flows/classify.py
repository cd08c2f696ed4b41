from __future__ import annotations

import time
import uuid

from prefect.runtime import flow_run

from cnn.device import resolve_device
from cnnpipe.predictions.classify import ClassifySummary
from cnnpipe.settings import REGISTERED_MODEL, get_settings
from flows.engine import flow
from flows.sharding import cluster_cpus, cluster_gpus, ray_task_runner, run_shards
from tasks.classify import (classify_images, classify_shard, commit_classified, monitor_drift, pin_model,
                            report_classify)


@flow(name="classify")
def classify(source: str, model: str = f"{REGISTERED_MODEL}@champion", checkpoint: str | None = None,
             device: str = "auto", batch_size: int = 256, ray_address: str | None = None,
             shards: int | None = None) -> ClassifySummary:
    """Classify every new image of `source` into the predictions database, with a registered
    model (`NAME@ALIAS` or `NAME/VERSION`) or, when given, a checkpoint file.

    With a Ray cluster (`ray_address`, or $CNNPIPE_RAY_ADDRESS) the source is split into
    `shards` (default: one per GPU, else per CPU of the cluster) that classify in parallel
    and stage Parquet parts; this process then commits them, as the only DuckDB writer.
    """
    run_id = flow_run.id or uuid.uuid4().hex
    address = ray_address or get_settings().ray_address
    if not address:
        summary = classify_images(source, model, checkpoint, str(resolve_device(device)), batch_size, run_id)
    else:
        started = time.perf_counter()
        pinned = model if checkpoint else pin_model(model)
        staged = classify_shards.with_options(task_runner=ray_task_runner(address))(
            source, pinned, checkpoint, device, batch_size, run_id, shards)
        summary = commit_classified(staged, time.perf_counter() - started)
    report_classify(summary)
    monitor_drift(summary)
    return summary


@flow(name="classify-shards")
def classify_shards(source: str, model: str, checkpoint: str | None, device: str, batch_size: int, run_id: str,
                    shards: int | None) -> list[ClassifySummary]:
    gpus = cluster_gpus()
    count = shards or gpus or cluster_cpus()
    return run_shards(lambda index: classify_shard.submit(source, model, checkpoint, "cuda" if gpus else device,
                                                          batch_size, run_id, index, count),
                      count, num_gpus=1 if gpus else 0)
