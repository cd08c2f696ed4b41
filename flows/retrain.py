from __future__ import annotations

from dataclasses import replace

from cnnpipe.models.params import TrainingParams
from cnnpipe.reports.outcomes import TrainingOutcome
from flows.engine import flow
from flows.ingest import ingest
from flows.train import train
from tasks.train import nightly_init, prepare_tracking, report_training, retraining_decision


@flow(name="retrain")
def retrain(dataset: str, source: str | None = None, force: bool = False,
            params: TrainingParams = TrainingParams()) -> TrainingOutcome:
    """Nightly retraining: ingest what is new in `source`, then train, evaluate, register and
    gate, unless the latest registered version was trained on this dataset version (or `force`).
    Without `params.init` it fine-tunes the champion when that fits (same model and input size,
    trained on this dataset), and trains from scratch every `params.scratch_every`th version and
    whenever the warm start does not beat the champion.

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
    if params.init is not None:
        return replace(train(dataset=dataset, params=params), ingested=ingested, why=why)
    prepare_tracking()
    init, start_why = nightly_init(params.registered_model, dataset, params.model, params.image_size,
                                   params.scratch_every, params.norm)
    why = f"{why}; {start_why}"
    outcome = train(dataset=dataset, params=params.model_copy(update={"init": init}))
    if init != "scratch" and outcome.decision is not None and not outcome.decision.promoted:
        warm = outcome
        outcome = train(dataset=dataset, params=params.model_copy(update={"init": "scratch"}))
        why = (f"{why}; the warm start {warm.model_name}/{warm.model_version} did not beat the champion "
               f"({warm.decision.reason}), so it trained again from scratch")
    return replace(outcome, ingested=ingested, why=why)
