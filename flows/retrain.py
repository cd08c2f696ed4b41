from __future__ import annotations

from dataclasses import replace

from prefect import flow

from cnnpipe.models.params import TrainingParams
from cnnpipe.reports.outcomes import TrainingOutcome
from flows.ingest import ingest
from flows.train import train
from tasks.train import report_training, retraining_decision


@flow(name="retrain")
def retrain(dataset: str, source: str | None = None, force: bool = False,
            params: TrainingParams = TrainingParams()) -> TrainingOutcome:
    """Nightly retraining: ingest what is new in `source`, then train, evaluate, register and
    gate, unless the latest registered version was trained on this dataset version (or `force`).

    Args:
        dataset: Dataset to add new images to and train on.
        source: Where new images arrive (any `cnnpipe ingest` source); empty: train on the store as is.
        force: Train even if the latest registered version was trained on this dataset version.
        params: How to train, and where to register the model; the options of `cnnpipe retrain`.
    """
    ingested = ingest(source=source, dataset=dataset) if source else None
    should_train, why = retraining_decision(params.registered_model, dataset)
    if not should_train and not force:
        return report_training(TrainingOutcome(skipped=why, ingested=ingested, why=why))
    if not should_train:
        why = f"training because of --force, although {why.removeprefix('not training: ')}"
    outcome = train(dataset=dataset, params=params)
    return replace(outcome, ingested=ingested, why=why)
