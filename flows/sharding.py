"""Running shards of a job on a Ray cluster through prefect-ray, for the ingest and classify flows."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from prefect.futures import PrefectFuture
from prefect.settings import get_current_settings

from cnnpipe.settings import get_settings

T = TypeVar("T")
SHARD_ATTEMPTS = 3


def ray_task_runner(address: str):
    from prefect_ray import RayTaskRunner

    # Workers see this run's home, stores, tracking server and Prefect API, whatever their own environment.
    env = get_settings().environment()
    if api_url := get_current_settings().api.url:
        env["PREFECT_API_URL"] = api_url
    return RayTaskRunner(address=address, init_kwargs={"runtime_env": {"env_vars": env}})


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_shards(submit: Callable[[int], PrefectFuture[T]], count: int, num_gpus: int = 0) -> list[T]:
    """Submit shards 0..count-1 and return their results in order.

    A shard whose worker dies is submitted again as a new task run (Ray's own retry would
    re-enter the dead attempt's task run); shards stage under names that a rerun reuses.
    """
    from prefect_ray.context import remote_options

    done: dict[int, T] = {}
    pending = list(range(count))
    for _attempt in range(SHARD_ATTEMPTS):
        with remote_options(num_gpus=num_gpus, max_retries=0):
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
