"""deploy/prefect.yaml names flows that exist, with parameters they take."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from prefect import Flow

PREFECT_YAML = Path(__file__).resolve().parents[2] / "deploy" / "prefect.yaml"


def test_every_deployment_points_at_a_flow_that_takes_its_parameters():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    names = [deployment["name"] for deployment in spec["deployments"]]
    assert names == ["ingest", "train", "classify"]
    for deployment in spec["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        accepted = inspect.signature(flow.fn).parameters
        assert set(deployment.get("parameters", {})) <= set(accepted), deployment["name"]
        assert deployment["work_pool"]["name"] == "cnnpipe"
