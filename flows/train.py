from __future__ import annotations

from dataclasses import replace

from prefect.runtime import flow_run

from cnn.device import resolve_device
from cnnpipe.models.params import TrainingParams
from cnnpipe.reports.outcomes import TrainingOutcome
from cnnpipe.settings import get_settings
from flows.engine import flow
from tasks.train import gate_champion, local_dataset, prepare_tracking, report_training, starting_point, train_and_log


@flow(name="train")
def train(dataset: str, params: TrainingParams = TrainingParams()) -> TrainingOutcome:
    """Train on a dataset of the store, log the run to MLflow, register the model, and
    promote it to `champion` only if it beats the current one on validation top-1. Knobs
    left empty (epochs, batch size, learning rate, regularisation) are chosen for the
    training split by `cnn.recipe`. With `nproc` > 1, training runs as DDP over that many
    processes on this machine. `params.init` says where the weights start (from scratch when empty).

    Args:
        dataset: Dataset in the store to train on.
        params: How to train, and where to register the model; the options of `cnnpipe train`.
    """
    dataset_dir = local_dataset(dataset)
    prepare_tracking()
    start = starting_point(params.init or "scratch", params.registered_model)
    config = params.config(dataset_dir, str(get_settings().checkpoints_dir), init=start.init)
    outcome = train_and_log(config, params.registered_model, flow_run.id, params.nproc, start)
    decision = gate_champion(outcome, config.dataset_dir, params.min_improvement, str(resolve_device(params.device)))
    return report_training(replace(outcome, decision=decision))
