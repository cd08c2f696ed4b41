from __future__ import annotations

from dataclasses import replace

from prefect import flow

from cnnpipe.settings import REGISTERED_MODEL
from flows.ingest import ingest
from flows.train import train
from tasks.train import TrainingOutcome, report_training, retraining_decision


@flow(name="retrain")
def retrain(
    dataset: str,
    source: str | None = None,
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
    force: bool = False,
    nproc: int = 1,
) -> TrainingOutcome:
    """Nightly retraining: ingest what is new in `source`, then train, evaluate, register and
    gate, unless the latest registered version was trained on this dataset version (or `force`)."""
    ingested = ingest(source=source, dataset=dataset) if source else None
    should_train, why = retraining_decision(registered_model, dataset)
    if not should_train and not force:
        return report_training(TrainingOutcome(skipped=why, ingested=ingested, why=why))
    if not should_train:
        why = f"training because of --force, although {why.removeprefix('not training: ')}"
    outcome = train(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                    label_smoothing=label_smoothing, weight_decay=weight_decay, norm=norm, dropout=dropout,
                    patience=patience, seed=seed, device=device, memory_budget_mb=memory_budget_mb,
                    precision=precision, ten_crop=ten_crop, compile=compile, resume=resume,
                    registered_model=registered_model, min_improvement=min_improvement, nproc=nproc)
    return replace(outcome, ingested=ingested, why=why)
