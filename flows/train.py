from __future__ import annotations

from prefect import flow

from cnn.train import FitResult, TrainConfig
from cnnpipe.errors import CnnpipeError
from cnnpipe.settings import get_settings
from cnnpipe.store import DatasetStore
from tasks.train import train_model


@flow(name="train")
def train(
    dataset: str,
    model: str = "alexnet-cifar",
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 0.2,
    schedule: str = "onecycle",
    label_smoothing: float = 0.1,
    norm: str | None = None,
    dropout: float = 0.5,
    patience: int | None = None,
    seed: int = 0,
    device: str = "auto",
    memory_budget_mb: int = 2048,
    ten_crop: bool = False,
    compile: bool = False,
    resume: bool | str = False,
) -> FitResult:
    """Train a model on a dataset of the store; returns metrics and the checkpoint path."""
    if not DatasetStore(dataset).exists():
        raise CnnpipeError(f"no dataset named {dataset!r}; ingest one with `cnnpipe ingest SOURCE --dataset {dataset}`")
    settings = get_settings()
    config = TrainConfig(
        dataset_dir=str(settings.dataset_dir(dataset)), model=model, epochs=epochs, batch_size=batch_size, lr=lr,
        schedule=schedule, label_smoothing=label_smoothing, norm=norm, dropout=dropout, patience=patience, seed=seed,
        device=device, memory_budget_mb=memory_budget_mb, ten_crop=ten_crop, compile=compile, resume=resume,
        checkpoint_root=str(settings.checkpoints_dir),
    )
    return train_model(config)
