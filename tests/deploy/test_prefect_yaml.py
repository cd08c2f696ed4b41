"""deploy/prefect.yaml names flows that exist, with parameters they take."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate

from cnnpipe.models.params import TrainingParams
from flows.retrain import retrain

PREFECT_YAML = Path(__file__).resolve().parents[2] / "deploy" / "prefect.yaml"


def test_every_deployment_points_at_a_flow_that_takes_its_parameters():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    names = [deployment["name"] for deployment in spec["deployments"]]
    assert names == ["nightly", "inbox", "ingest", "train", "audit"]
    for deployment in spec["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        accepted = inspect.signature(flow.fn).parameters
        parameters = deployment.get("parameters", {})
        assert set(parameters) <= set(accepted), deployment["name"]
        # As `prefect deploy` checks them (the UI's form is this schema), and as a run receives them.
        validate(parameters, parameter_schema(flow).model_dump(), raise_on_error=True, ignore_required=True)
        flow.validate_parameters(parameters)
        assert deployment["work_pool"]["name"] == "cnnpipe"


def test_the_training_deployments_set_their_knobs_in_params():
    deployments = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    for name in ("nightly", "train"):
        params = deployments[name]["parameters"]["params"]
        assert params["model"] == "alexnet-cifar" and set(params) <= set(TrainingParams.model_fields)
    bad = {**deployments["nightly"]["parameters"], "params": {"epoch": 3}}
    with pytest.raises(ValidationError, match="'epoch' was unexpected"):
        validate(bad, parameter_schema(retrain).model_dump(), raise_on_error=True)


def test_the_nightly_retraining_and_the_inbox_are_scheduled_with_a_timezone_and_a_slug():
    deployments = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    assert deployments["nightly"]["entrypoint"] == "flows/retrain.py:retrain"
    assert deployments["nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "slug": "nightly"}]
    assert deployments["inbox"]["entrypoint"] == "flows/classify.py:classify"
    assert deployments["inbox"]["schedules"][0]["cron"] == "*/15 * * * *"
    assert {d["schedules"][0]["slug"] for d in deployments.values() if "schedules" in d} == {"nightly", "every-15-minutes"}
