from __future__ import annotations

from dataclasses import replace

from prefect import flow
from prefect.runtime import flow_run

from cnn.train import TrainConfig, resolve_device
from cnnpipe.settings import REGISTERED_MODEL, get_settings
from tasks.train import (TrainingOutcome, gate_champion, local_dataset, prepare_tracking, report_training,
                         train_and_log)


@flow(name="train")
def train(
    dataset: str,
    model: str = "alexnet-cifar",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    schedule: str = "onecycle",
    label_smoothing: float | None = None,
    weight_decay: float | None = None,
    norm: str | None = None,
    dropout: float | None = None,
    patience: int | None = None,
    seed: int = 0,
    device: str = "auto",
    memory_budget_mb: int | None = None,
    precision: str = "auto",
    ten_crop: bool = False,
    compile: bool = False,
    resume: bool | str = False,
    registered_model: str = REGISTERED_MODEL,
    min_improvement: float = 0.0,
    nproc: int = 1,
) -> TrainingOutcome:
    """Train on a dataset of the store, log the run to MLflow, register the model, and
    promote it to `champion` only if it beats the current one on validation top-1. Knobs
    left None (epochs, batch size, learning rate, regularisation) are chosen for the
    training split by `cnn.recipe`. With `nproc` > 1, training runs as DDP over that many
    processes on this machine."""
    settings = get_settings()
    config = TrainConfig(
        dataset_dir=local_dataset(dataset), model=model, epochs=epochs, batch_size=batch_size, lr=lr,
        schedule=schedule, label_smoothing=label_smoothing, weight_decay=weight_decay, norm=norm, dropout=dropout,
        patience=patience, seed=seed, device=device, memory_budget_mb=memory_budget_mb, precision=precision,
        ten_crop=ten_crop,
        compile=compile, resume=resume, checkpoint_root=str(settings.checkpoints_dir),
    )
    prepare_tracking()
    outcome = train_and_log(config, registered_model, flow_run.id, nproc)
    decision = gate_champion(outcome, config.dataset_dir, min_improvement, str(resolve_device(device)))
    return report_training(replace(outcome, decision=decision))
