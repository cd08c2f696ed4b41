"""Thin Prefect tasks: train and log to MLflow, gate the new version, report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

import mlflow

from cnn import recipe as auto_recipe
from cnn.checkpoint import CheckpointError, checkpoint_path
from cnn.config import TrainConfig
from cnn.device import resolve_device
from cnn.launch import fit_distributed
from cnn.layout import LayoutError, PublishedDataset
from cnn.loop import TrainingDiverged
from cnn.splits import UnreadablePart
from cnn.train import FitResult, fit, plan
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import refs, registry, tracking
from cnnpipe.models.warm_start import StartingPoint, nightly_start, resolve_start, version_tags
from cnnpipe.monitoring.audit import LeakCheck, leak_check
from cnnpipe.predictions import champions
from cnnpipe.predictions.champions import GateDecision
from cnnpipe.predictions.records import record_reference_profile
from cnnpipe.reports.markdown import training_markdown
from cnnpipe.reports.outcomes import TrainingOutcome
from cnnpipe.reports.progress import TrainingProgress
from cnnpipe.settings import get_settings
from cnnpipe.store import DatasetStore
from tasks.retry import is_transient_io_error


# Creating a fresh SQLite store can meet another process's lock; a retry finds it ready.
@task(name="prepare-tracking", retries=2, retry_delay_seconds=2)
def prepare_tracking() -> None:
    tracking.connect()


# Fetching a registered version's weights can meet a tracking server that is restarting.
@task(name="starting-point", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient_io_error,
      cache_policy=NO_CACHE)
def starting_point(init: str, registered_model: str) -> StartingPoint:
    """Where the run's weights start: `--init` with a registered version fetched to a local file."""
    return resolve_start(init, registered_model)


@task(name="nightly-start", cache_policy=NO_CACHE)
def nightly_init(registered_model: str, dataset: str, model: str, image_size: int | None, scratch_every: int,
                 norm: str | None = None) -> tuple[str, str]:
    """retrain's `--init` when none is given: the champion when it fits, else scratch; and why."""
    init, why = nightly_start(registered_model, dataset, model, image_size, scratch_every, norm=norm)
    get_run_logger().info(why)
    return init, why


@task(name="train-and-log", cache_policy=NO_CACHE)
def train_and_log(config: TrainConfig, registered_model: str, flow_run_id: str | None,
                  nproc: int = 1, start: StartingPoint = StartingPoint()) -> TrainingOutcome:
    """One MLflow run around `fit` (DDP over `nproc` processes through torchrun when > 1):
    params, per-epoch metrics, evaluation artifacts, the registered model, and the run it
    started from, linked as its parent."""
    logger = get_run_logger()
    try:
        manifest = PublishedDataset.open(config.dataset_dir).manifest
    except LayoutError as exc:
        raise CnnpipeError(str(exc)) from None
    try:
        planned = plan(config)
    except (ValueError, CheckpointError) as exc:
        raise CnnpipeError(f"dataset {manifest['name']}: {exc}") from None
    config, chosen, warnings = planned.config, planned.recipe, planned.warnings
    lines, started_from = planned.lines(), ""
    if planned.init is not None:
        started_from = f"init from {start.label}: {planned.init.text()}"
        lines.append(started_from)
    elif planned.resuming is not None:  # it continues from its own checkpoint, whatever --init says
        start = StartingPoint()
    for line in lines:
        logger.info(line)
    for text in warnings:
        logger.warning(text)
    progress = TrainingProgress(config.epochs, chosen.train_images, logger)
    checked_epoch = auto_recipe.stall_check_epoch(chosen)

    def on_epoch(record: dict) -> None:
        progress.on_epoch(record)
        tracking.log_epoch(record)
        stalled = record["epoch"] == checked_epoch and auto_recipe.stalled_warning(
            record, len(manifest["classes"]), chosen)
        if stalled:
            logger.warning(stalled)
            warnings.append(stalled)

    with tracking.training_run(f"{manifest['name']} {config.model}", {"registered_model": registered_model,
                                                                      **tracking.lineage_tags(start)}) as run:
        tracking.log_config(config, manifest, str(resolve_device(config.device)), flow_run_id, chosen)
        mlflow.log_params(start.params())
        try:
            if nproc > 1:
                mlflow.log_param("nproc", nproc)
                result = fit_distributed(config, nproc, on_epoch=on_epoch)
            else:
                result = fit(config, on_step=progress.on_step, on_epoch=on_epoch)
        except UnreadablePart as exc:
            raise DatasetStore(manifest["name"]).damaged_part_error(exc.path, exc.problem) from None
        except CheckpointError as exc:  # a full disk, or no checkpoint left to resume from
            raise CnnpipeError(str(exc)) from None
        except TrainingDiverged as exc:  # before `log_model`: nothing is registered, let alone promoted
            raise CnnpipeError(diverged_line(exc, config)) from None
        finally:
            progress.close()
        tracking.log_evaluation(result)
        leaks = _leak_check(manifest["name"], result, config.device)
        if leaks is not None:
            logger.info(leaks.line())
            mlflow.log_metrics(leak_figures(leaks))
        version = tracking.log_model(result, registered_model)
        registry.describe_version(registry.client(), version, {
            "dataset": manifest["name"], "dataset_version_id": result.dataset_version,
            registry.GATE_METRIC: f"{result.history[-1]['val_top1']:.6f}",
            f"{result.held_out_split}_top1": f"{result.held_out['top1']:.6f}",
            f"{result.held_out_split}_top5": f"{result.held_out['top5']:.6f}",
            "model": config.model, "checkpoint": result.checkpoint, **version_tags(start),
            **({name: f"{value:g}" for name, value in leak_figures(leaks).items()} if leaks else {}),
        })
    try:  # fit always profiles; a result read back from an older run may not have one
        if result.reference:
            record_reference_profile(get_settings().predictions_db, version.name, refs.version_id(version),
                                     result.dataset_version, result.reference)
    except CnnpipeError as exc:  # a long query holding the database; MLflow keeps the profile as well
        logger.warning("%s; the reference profile is in MLflow as monitoring/reference.json", exc)
    result = replace(result, mistakes=[])  # images: logged as a grid, too heavy to pass on
    held = result.held_out
    logger.info("held-out %s split: top-1 %.1f%%, top-5 %.1f%% on %d images; MLflow run %s; registered %s/%s",
                result.held_out_split, 100 * held["top1"], 100 * held["top5"], held["images"], run.info.run_id,
                version.name, version.version)
    return TrainingOutcome(result, run.info.run_id, tracking.run_url(run), version.name,
                           refs.version_id(version), recipe=chosen, warnings=warnings, started_from=started_from,
                           leaks=leaks.line() if leaks else "")


def _leak_check(dataset: str, result: FitResult, device: str) -> LeakCheck | None:
    """The held-out images with a twin in train, and the top-1 without them: seconds, and never the
    reason a run fails (it says why it was not done)."""
    held = result.held_out
    try:
        return leak_check(DatasetStore(dataset), result.checkpoint, result.held_out_split, int(held["images"]),
                          float(held["top1"]), str(resolve_device(device)))
    except (CnnpipeError, OSError, ValueError) as exc:
        get_run_logger().warning("leak check not done: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None


def leak_figures(leaks: LeakCheck) -> dict[str, float]:
    """What MLflow and the registered version keep of a leak check. Leaked images stay in the
    held-out figure, which stays comparable across versions; this one leaves them out."""
    figures = {f"leaked_{leaks.split}_images": float(leaks.leaked)}
    if leaks.top1_without_leaks is not None:
        figures[f"{leaks.split}_top1_without_leaks"] = leaks.top1_without_leaks
    return figures


def diverged_line(diverged: TrainingDiverged, config: TrainConfig) -> str:
    """Why a run stopped, in which epoch, what to try, and where its last good epoch is kept."""
    epoch = diverged.epoch or 1
    kept = "no epoch finished before it, so no checkpoint predates it"
    if diverged.run_dir is not None and checkpoint_path(diverged.run_dir, epoch - 1).exists():
        kept = f"the checkpoint of epoch {epoch - 1} is kept in {diverged.run_dir}"
    elif epoch > 1:
        kept = "the checkpoints of the epochs before it are kept"
    return (f"training diverged in epoch {epoch}: {diverged}; train again with --lr {config.lr / 10:g} "
            f"(a tenth of {config.lr:g}); {kept}")


@task(name="gate-champion", cache_policy=NO_CACHE)
def gate_champion(outcome: TrainingOutcome, dataset_dir: str, min_improvement: float, device: str) -> GateDecision:
    mlflow_client = registry.client()
    version = mlflow_client.get_model_version(outcome.model_name, outcome.model_version)
    return champions.gate(mlflow_client, version, outcome.fit.history[-1]["val_top1"], Path(dataset_dir),
                         outcome.fit.dataset_version, min_improvement, device)


# Fetching a dataset from object storage can meet a flaky network; what arrived is kept.
@task(name="local-dataset", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient_io_error,
      cache_policy=NO_CACHE)
def local_dataset(dataset: str) -> str:
    """The folder training reads: the store's own, or a local copy of one on object storage."""
    store = DatasetStore(dataset)
    if not store.exists():
        raise CnnpipeError(f"no dataset named {dataset!r}; ingest one with `cnnpipe ingest SOURCE --dataset {dataset}`")
    return str(store.local_copy())


@task(name="retraining-decision", cache_policy=NO_CACHE)
def retraining_decision(registered_model: str, dataset: str) -> tuple[bool, str]:
    """Whether the nightly run should train, and why: only when the dataset version differs from
    the one the latest registered version was trained on, champion or not. Comparing with the
    champion alone would retrain on the same data every night once a challenger has lost."""
    why = _retraining_reason(registered_model, dataset)
    get_run_logger().info(why)
    return not why.startswith("not training"), why


def _retraining_reason(registered_model: str, dataset: str) -> str:
    store = DatasetStore(dataset)
    if not store.exists():
        return f"training: dataset {dataset} is new"  # training then says the dataset is missing
    manifest = store.manifest()
    at = f"dataset {manifest['name']} is at version {manifest['version']} (`{manifest['version_id']}`)"
    latest = registry.latest_version(registry.client(), registered_model)
    if latest is None:
        return f"training: {at} and {registered_model} has no registered version yet"
    trained_on = latest.tags.get("dataset_version_id", "")
    if latest.tags.get("dataset") == manifest["name"] and trained_on == manifest["version_id"]:
        return (f"not training: {at}, on which the latest version {registered_model}/{latest.version} "
                "was trained; nothing to retrain (use --force to train anyway)")
    return (f"training: {at}; the latest version {registered_model}/{latest.version} was trained on "
            f"{latest.tags.get('dataset', 'another dataset')} `{trained_on or 'unknown'}`")


@task(name="report-training", cache_policy=NO_CACHE)
def report_training(outcome: TrainingOutcome) -> TrainingOutcome:
    create_markdown_artifact(training_markdown(outcome), key="training-report",
                             description="Training, evaluation and promotion decision")
    return outcome
