from __future__ import annotations

from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions, IngestSummary, StagedRun, resolve_options
from flows.engine import flow
from flows.sharding import cluster_cpus, ray_task_runner, run_shards
from tasks.ingest import (commit_version, merge_shards, record_labels, recover_dataset, report_ingest, stage_images,
                          stage_relabel, stage_shard)


@flow(name="ingest")
def ingest(
    source: str,
    dataset: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    resize: int | None = None,
    workers: int | None = None,
    max_reject_fraction: float = 0.5,
    ray_address: str | None = None,
    shards: int | None = None,
    relabel: bool = False,
    new_classes: tuple[str, ...] = (),
) -> IngestSummary:
    """Add the new images of `source` to `dataset` as one new version.

    With a Ray cluster (`ray_address`, or $CNNPIPE_RAY_ADDRESS) the source is split into
    `shards` (default: one per CPU of the cluster) that read, hash and validate in parallel
    and stage Parquet parts; this process then merges them and commits, as the only writer.

    With `relabel`, the version instead gives images already in `dataset` the labels `source`
    gives them (`cnnpipe.store.relabel`), in this process: it decodes nothing and copies only the
    parts that hold them. `new_classes` are the labels it may introduce.
    """
    options = IngestOptions(val_fraction, test_fraction, resize, workers)
    address = ray_address or get_settings().ray_address
    # One writer per dataset, held from recovery to commit.
    with DatasetStore(dataset).lock():
        recover_dataset(dataset)
        if relabel:
            staged = stage_relabel(source, dataset, tuple(new_classes))
        elif address:
            staged = merge_shards(dataset, ingest_shards.with_options(task_runner=ray_task_runner(address))(
                source, dataset, options, shards))
        else:
            staged = stage_images(source, dataset, options)
        summary = commit_version(staged)
        record_labels(dataset)
    return report_ingest(summary, max_reject_fraction)


@flow(name="ingest-shards")
def ingest_shards(source: str, dataset: str, options: IngestOptions, shards: int | None) -> list[StagedRun]:
    # Decoding is CPU work: unlike classification, an ingest shard holds no GPU.
    count = shards or cluster_cpus()
    # Whether train/ images are carved into val is the whole source's decision: take it once here.
    options = resolve_options(open_source(source), options)
    return run_shards(lambda index: stage_shard.submit(source, dataset, options, index, count), count)
