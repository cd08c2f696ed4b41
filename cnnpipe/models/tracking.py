"""MLflow tracking: one run per training, with its params, curves, evaluation and model.

    client = tracking.connect()                 # store ready, stale runs reconciled
    with tracking.training_run("cifar10 alexnet-cifar", tags) as run:
        tracking.log_config(config, ...)
        fit(config, on_epoch=tracking.log_epoch)
        tracking.log_evaluation(result)
        version = tracking.log_model(result, "cnn-classifier")

A run ends FINISHED, FAILED with the reason in its `cnnpipe.failure` tag, or KILLED on SIGTERM;
one whose process died without a word (SIGKILL, power loss) is marked FAILED by the next
`connect()` on the same host.
"""

from __future__ import annotations

import csv
import logging
import os
import platform
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import psutil
import torch
from mlflow.entities import Run
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from cnn.augment import ColourStats, normalise
from cnn.config import TrainConfig
from cnn.device import uses_bf16
from cnn.model import decode_size, input_size
from cnn.recipe import Recipe
from cnn.runs import inference_state, load_trained_model, resize_mode
from cnn.train import FitResult
from cnnpipe.base.locks import file_lock
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import plots
from cnnpipe.models.registry import WEIGHTS_FILE
from cnnpipe.models.warm_start import StartingPoint
from cnnpipe.settings import MLFLOW_EXPERIMENT, Settings, get_settings

log = logging.getLogger("cnnpipe.tracking")

HOST_TAG, PID_TAG, PID_STARTED_TAG = "cnnpipe.host", "cnnpipe.pid", "cnnpipe.pid_started"
FAILURE_TAG = "cnnpipe.failure"
AUDIT_TAG = "cnnpipe.audit"
# MLflow refuses longer tag values, and a stored SQL statement or traceback says nothing more.
MAX_TAG_CHARACTERS = 5000


def connect(settings: Settings | None = None) -> MlflowClient:
    """Point MLflow at the configured store and experiment, then reconcile runs left RUNNING."""
    settings = settings or get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    # Two processes creating a fresh SQLite store at once race on its schema migration:
    # the first to take the lock creates it, the others find it ready.
    with file_lock(settings.locks_dir / "mlflow.lock"):
        experiment = mlflow.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if experiment is None:
            artifacts = settings.mlflow_artifacts_dir
            experiment_id = mlflow.create_experiment(
                MLFLOW_EXPERIMENT, artifact_location=artifacts.as_uri() if artifacts else None)
        else:
            experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    client = MlflowClient(settings.mlflow_tracking_uri)
    for run_id in reconcile_stale_runs(client, experiment_id):
        log.warning("MLflow run %s was left RUNNING by a process that no longer exists; marked FAILED", run_id)
    return client


def _process_started(pid: int) -> str:
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def reconcile_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this host whose process is gone. Finished runs are never touched."""
    stale = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
            continue  # another machine's run: only that machine can tell whether it still lives
        if _process_started(int(tags[PID_TAG])) == tags.get(PID_STARTED_TAG):
            continue
        client.set_tag(run.info.run_id, "cnnpipe.reconciled", "its process ended without closing the run")
        client.set_terminated(run.info.run_id, status="FAILED")
        stale.append(run.info.run_id)
    return stale


class RunTerminated(BaseException):
    """SIGTERM arrived while a tracked run was active and nobody else handles it."""


@contextmanager
def training_run(run_name: str, tags: dict[str, str]) -> Iterator[Run]:
    """An active MLflow run that ends FINISHED, FAILED, or KILLED when SIGTERM stops it."""
    pid = os.getpid()
    tags = {**tags, HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_STARTED_TAG: _process_started(pid)}
    run = mlflow.start_run(run_name=run_name, tags=tags, log_system_metrics=True)
    terminated = threading.Event()
    previous = None

    def on_sigterm(signum, frame):
        terminated.set()
        # Prefect's own handler (if any) turns SIGTERM into its TerminationSignal; keep that.
        if callable(previous):
            previous(signum, frame)
        raise RunTerminated("SIGTERM")

    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    status, failure = "FAILED", None
    try:
        yield run
        status = "FINISHED"
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if terminated.is_set():
            status = "KILLED"
        _end_run(run, status, failure)


def _end_run(run: Run, status: str, failure: BaseException | None) -> None:
    """End the run with its status and, when it failed, the reason as the `cnnpipe.failure` tag."""
    try:
        try:
            if failure is not None:
                mlflow.set_tag(FAILURE_TAG, failure_reason(failure)[:MAX_TAG_CHARACTERS])
        finally:
            mlflow.end_run(status=status)
    except Exception as closing:
        if failure is None:
            raise
        # What failed the run (a full disk) may fail the tracking store too: the run's own error is the one to see.
        log.warning("MLflow run %s could not be marked %s: %s", run.info.run_id, status, failure_reason(closing))


def failure_reason(error: BaseException) -> str:
    """Why a run failed, in one line: a CnnpipeError's message already says it for a user."""
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, CnnpipeError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def lineage_tags(start: StartingPoint) -> dict[str, str]:
    """Tags that link a run to the run of the registered version it started from: the MLflow UI
    shows it nested under that parent, and says so in its description."""
    if not start.run_id:
        return {}
    return {MLFLOW_PARENT_RUN_ID: start.run_id,
            MLFLOW_RUN_NOTE: f"Fine-tuned from {start.model_version} (its run: {start.run_id})."}


def log_config(config: TrainConfig, manifest: dict, device: str, flow_run_id: str | None,
               recipe: Recipe | None = None) -> None:
    params = {f"config.{key}": value for key, value in asdict(config).items()
              if key not in ("dataset_dir", "checkpoint_root", "resume")}
    if recipe is not None:
        params.update(recipe.params())
        mlflow.set_tag("recipe", recipe.line())
    classes = manifest["classes"]
    params.update({
        "dataset": manifest["name"], "dataset_version": manifest["version"], "dataset_version_id": manifest["version_id"],
        "num_classes": len(classes), "seed": config.seed, "device": device,
        "bf16": uses_bf16(torch.device(device), config.precision),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "",
        "torch": torch.__version__, "torchvision": package_version("torchvision"),
        "cnn_pipeline": package_version("cnn-pipeline"), "python": platform.python_version(),
    })
    # MLflow caps a param at 6000 characters; the list always goes in classes.json as well.
    joined = ",".join(classes)
    if len(joined) <= 6000:
        params["classes"] = joined
    mlflow.log_params(params)
    mlflow.log_dict({"classes": classes}, "classes.json")
    mlflow.set_tags({"dataset": manifest["name"], "dataset_version_id": manifest["version_id"],
                     "prefect.flow_run_id": flow_run_id or "", "model": config.model})


def log_epoch(record: dict) -> None:
    step = record["epoch"]
    mlflow.log_metrics({key: float(value) for key, value in record.items() if key != "epoch"}, step=step)


def log_evaluation(result: FitResult) -> dict:
    """Held-out figures as metrics; plots, the per-class table and the report as artifacts."""
    report = result.extra["report"]
    split = result.held_out_split
    held = result.held_out
    metrics = {f"{split}_top1": report["top1"], f"{split}_top5": report["top5"],
               f"{split}_top1_error": report["top1_error"], f"{split}_top5_error": report["top5_error"],
               f"{split}_loss": held["loss"], f"{split}_ece": report["ece"],
               f"{split}_macro_f1": report["macro"]["f1"], f"{split}_weighted_f1": report["weighted"]["f1"],
               "best_val_top1": result.best_val_top1, "final_val_top1": result.history[-1]["val_top1"]}
    if "ten_crop_top1" in held:
        metrics.update({f"{split}_ten_crop_top1": held["ten_crop_top1"], f"{split}_ten_crop_top5": held["ten_crop_top5"]})
    mlflow.log_metrics(metrics)
    classes = result.classes
    with tempfile.TemporaryDirectory(prefix="cnnpipe-artifacts-") as scratch:
        folder = Path(scratch)
        plots.training_curves(result.history, folder / "training_curves.png")
        plots.confusion_matrix(report["confusion_matrix"], classes, folder / "confusion_matrix.png")
        plots.reliability_diagram(report["reliability"], report["ece"], folder / "reliability_diagram.png")
        plots.mistakes_grid(result.mistakes, classes, folder / "confident_mistakes.png")
        if result.extra.get("embedding_map", {}).get("x"):
            plots.embedding_map(result.extra["embedding_map"], classes, folder / "embedding_map.png")
        mlflow.log_artifacts(str(folder), "plots")
    rows = report["per_class"]
    with tempfile.TemporaryDirectory(prefix="cnnpipe-artifacts-") as scratch:
        table = Path(scratch) / "per_class_metrics.csv"
        with open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        mlflow.log_artifact(str(table), "evaluation")
    mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, "evaluation/per_class_metrics.json")
    summary = {**report, "mistakes": [{key: m[key] for key in ("target", "predicted", "confidence")} | {
        "true_label": classes[m["target"]], "predicted_label": classes[m["predicted"]]} for m in result.mistakes]}
    mlflow.log_dict(summary, "evaluation/report.json")
    if result.reference:
        mlflow.log_dict(result.reference, "monitoring/reference.json")
        mlflow.log_metric("temperature", result.reference["temperature"])
    return metrics


def log_model(result: FitResult, registered_model: str) -> mlflow.entities.model_registry.ModelVersion:
    """Log the model with its classes and preprocessing, and register it as a new version.

    The MLflow model is the `pt2` export (no pickle); beside it, `extra_files/weights.pt`
    holds the state_dict and metadata that `cnnpipe.models.registry` loads with `weights_only=True`.
    """
    model, state = load_trained_model(result.checkpoint, "cpu")
    crop = input_size(model)
    stats = state["colour_stats"]
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((2, 3, crop, crop), generator=generator)
    normalised = normalise(example, ColourStats(**stats)).contiguous()
    with torch.no_grad():
        output = model(normalised).softmax(1)
    preprocessing = {
        "input": "float32 NCHW, RGB scaled to [0, 1], minus mean, divided by std",
        "decode_size": decode_size(crop), "input_size": crop,
        "resize": "shorter side to decode_size, centre crop" if resize_mode(state["config"]) == "crop"
        else "the whole image to decode_size x decode_size",
        "mean": stats["mean"], "std": stats["std"], "output": "class probabilities, in the order of `classes`",
    }
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as scratch:
        weights = Path(scratch) / WEIGHTS_FILE
        torch.save(inference_state(state, result.checkpoint), weights)
        info = mlflow.pytorch.log_model(
            _Softmax(model).eval(), name="model", signature=infer_signature(normalised.numpy(), output.numpy()),
            input_example=normalised.numpy(), extra_files=[str(weights)], registered_model_name=registered_model,
            metadata={"classes": result.classes, "preprocessing": preprocessing,
                      "dataset_version_id": result.dataset_version},
            # Listing requirements explicitly spares MLflow a slow inference in a subprocess.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    client = MlflowClient()
    return client.get_model_version(registered_model, str(info.registered_model_version))


class _Softmax(torch.nn.Module):
    """The served model returns probabilities, as `cnnpipe classify` does."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).softmax(dim=1)


def run_url(run: Run) -> str:
    """A link to the run in the MLflow UI (for a local store: what `mlflow ui` serves)."""
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"



def log_audit(dataset: str, dataset_version: str, metrics: dict[str, float], folder: Path) -> str:
    """An audit's MLflow run (tagged `cnnpipe.audit`, beside the training runs): its figures, and
    its report folder as the `audit/` artifacts."""
    connect()
    with mlflow.start_run(run_name=f"audit {dataset}",
                          tags={AUDIT_TAG: dataset, "dataset_version_id": dataset_version}) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(folder), "audit")
    return run.info.run_id
