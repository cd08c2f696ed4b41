"""The deployments `cnnpipe serve` runs: nightly retraining and classification of an inbox.

Building them deploys nothing; `prefect.serve` does, for as long as the process lives, on
the Prefect API this process uses: a server if there is one, else an ephemeral API that
lives and dies with the process.
"""

from __future__ import annotations

from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from cnnpipe.models.params import TrainingParams
from flows.classify import classify
from flows.retrain import retrain

NIGHTLY = "0 2 * * *"
EVERY_15_MINUTES = "*/15 * * * *"


def build_deployments(dataset: str, source: str | None = None, cron: str = NIGHTLY, timezone: str = "UTC",
                      inbox: str | None = None, inbox_cron: str = EVERY_15_MINUTES, model: str | None = None,
                      params: TrainingParams | None = None) -> list[RunnerDeployment]:
    """The nightly retraining and, with `inbox`, its classifier; `params` are the nightly's training
    parameters, of which the deployment keeps those that differ from the defaults."""
    training = params.model_dump(mode="json", exclude_defaults=True) if params else {}
    deployments = [retrain.to_deployment(
        name="nightly", schedule=Cron(cron, timezone=timezone),
        parameters={"dataset": dataset, "source": source, **({"params": training} if training else {})},
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


def serving_message(deployments: list[RunnerDeployment], api_url: str | None) -> str:
    """What the served deployments can be used for, which depends on where they are registered."""
    names = ", ".join(deployment.full_name for deployment in deployments)
    if api_url:
        return (f"Registering {names} on the Prefect server at {api_url}. From any shell:\n"
                f"  PREFECT_API_URL={api_url} prefect deployment run {deployments[0].full_name}")
    return (f"Serving {names} on an ephemeral Prefect API inside this process. Their schedules run while it "
            "runs, but no UI shows them and `prefect deployment run` from another shell cannot reach them: the "
            "API ends with this process. Run `cnnpipe server start` first to register them on a server that the "
            "UI and any shell can reach.")
