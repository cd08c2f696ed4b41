from __future__ import annotations

import time
import uuid

from prefect import flow
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from cnn.train import resolve_device
from cnnpipe.classify import ClassifySummary
from cnnpipe.settings import REGISTERED_MODEL, get_settings
from tasks.classify import classify_images, classify_shard, commit_classified, pin_model, report_classify


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
        return report_classify(classify_images(source, model, checkpoint, str(resolve_device(device)), batch_size,
                                               run_id))
    from prefect_ray import RayTaskRunner

    started = time.perf_counter()
    pinned = model if checkpoint else pin_model(model)
    # Workers see this run's home, tracking server and Prefect API, whatever their own environment.
    env = get_settings().environment()
    if api_url := get_current_settings().api.url:
        env["PREFECT_API_URL"] = api_url
    runner = RayTaskRunner(address=address, init_kwargs={"runtime_env": {"env_vars": env}})
    staged = classify_shards.with_options(task_runner=runner)(
        source, pinned, checkpoint, device, batch_size, run_id, shards)
    return report_classify(commit_classified(staged, time.perf_counter() - started))


@flow(name="classify-shards")
def classify_shards(source: str, model: str, checkpoint: str | None, device: str, batch_size: int, run_id: str,
                    shards: int | None) -> list[ClassifySummary]:
    import ray
    from prefect_ray.context import remote_options

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = shards or max(1, gpus or int(resources.get("CPU", 1)))

    def submit(index: int):
        return classify_shard.submit(source, model, checkpoint, "cuda" if gpus else device, batch_size, run_id,
                                     index, count)

    # A shard whose worker dies is submitted again as a new task run (Ray's own retry would
    # re-enter the dead attempt's task run). Its staged parts are rewritten under the same names.
    done: dict[int, ClassifySummary] = {}
    pending = list(range(count))
    for _attempt in range(SHARD_ATTEMPTS):
        with remote_options(num_gpus=1 if gpus else 0, max_retries=0):
            futures = {index: submit(index) for index in pending}
        pending = []
        for index, future in futures.items():
            try:
                done[index] = future.result()
            except Exception:  # noqa: BLE001 - the worker died or the shard failed; try it again
                pending.append(index)
        if not pending:
            return [done[index] for index in range(count)]
    raise RuntimeError(f"shards {pending} of {count} failed {SHARD_ATTEMPTS} times; rerun to finish, "
                       "nothing staged so far is lost")


SHARD_ATTEMPTS = 3
