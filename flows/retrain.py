from __future__ import annotations

from prefect import flow

from cnnpipe.settings import REGISTERED_MODEL
from flows.ingest import ingest
from flows.train import train
from tasks.train import TrainingOutcome, report_training, unchanged_since_champion


@flow(name="retrain")
def retrain(
    dataset: str,
    source: str | None = None,
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
    registered_model: str = REGISTERED_MODEL,
    min_improvement: float = 0.0,
    force: bool = False,
    nproc: int = 1,
) -> TrainingOutcome:
    """Nightly retraining: ingest what is new in `source`, then train, evaluate, register and
    gate, unless the dataset has not changed since the champion was trained (or `force`)."""
    if source:
        ingest(source=source, dataset=dataset)
    unchanged = unchanged_since_champion(registered_model, dataset)
    if unchanged and not force:
        return report_training(TrainingOutcome(skipped=unchanged))
    return train(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                 label_smoothing=label_smoothing, norm=norm, dropout=dropout, patience=patience, seed=seed,
                 device=device, memory_budget_mb=memory_budget_mb, ten_crop=ten_crop, compile=compile, resume=resume,
                 registered_model=registered_model, min_improvement=min_improvement, nproc=nproc)
