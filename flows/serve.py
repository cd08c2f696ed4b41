"""The deployments `cnnpipe serve` runs: nightly retraining and classification of an inbox.

Building them deploys nothing; `prefect.serve` does, for as long as the process lives.
"""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.classify import classify
from flows.retrain import retrain

NIGHTLY = "0 2 * * *"
EVERY_15_MINUTES = "*/15 * * * *"


def build_deployments(dataset: str, source: str | None = None, cron: str = NIGHTLY, timezone: str = "UTC",
                      inbox: str | None = None, inbox_cron: str = EVERY_15_MINUTES, model: str | None = None,
                      training: dict[str, Any] | None = None) -> list[RunnerDeployment]:
    deployments = [retrain.to_deployment(
        name="nightly", schedule=Cron(cron, timezone=timezone),
        parameters={"dataset": dataset, "source": source, **(training or {})},
        description=f"Retrain on {dataset} ({cron}, {timezone}); promote only a better model.",
    )]
    if inbox:
        parameters: dict[str, Any] = {"source": inbox}
        if model:
            parameters["model"] = model
        deployments.append(classify.to_deployment(
            name="inbox", schedule=Cron(inbox_cron, timezone=timezone), parameters=parameters,
            description=f"Classify new images in {inbox} ({inbox_cron}, {timezone}).",
        ))
    return deployments
