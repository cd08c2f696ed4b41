"""The training knobs are written once: TrainConfig's defaults and choices reach TrainingParams,
both flows' Prefect parameter schemas, and the options of `cnnpipe train`, `retrain` and `serve`."""

from __future__ import annotations

import typing
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from cnn.config import TrainConfig, flag
from cnnpipe.cli import cli
from cnnpipe.models.params import KNOBS, PLACEMENT, TrainingParams
from cnnpipe.reports.outcomes import TrainingOutcome

RUN_LEVEL = ("registered_model", "min_improvement", "nproc", "init", "scratch_every")


def test_training_params_are_train_configs_knobs_with_its_defaults_and_types():
    declared = [f.name for f in fields(TrainConfig) if f.name not in PLACEMENT]
    assert list(TrainingParams.model_fields) == [*declared, *RUN_LEVEL] and KNOBS == tuple(declared)
    hints = typing.get_type_hints(TrainConfig)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name in KNOBS:
        field = TrainingParams.model_fields[name]
        assert (field.annotation, field.default) == (hints[name], defaults[name]), name
        assert field.description, name
    assert TrainingParams().config("data") == TrainConfig(dataset_dir="data")


def test_training_params_refuse_an_unknown_knob_and_leave_range_checks_to_train_config():
    with pytest.raises(ValueError, match="epoch"):
        TrainingParams(epoch=3)
    with pytest.raises(ValueError, match="^--momentum must be in \\[0, 1\\), not 1.5$"):
        TrainingParams(momentum=1.5).config("data")
    with pytest.raises(ValueError, match="^--padding must be one of zeros, replicate, not 'same'$"):
        TrainConfig(dataset_dir="data", padding="same")


@pytest.mark.parametrize("entrypoint", ["flows.train:train", "flows.retrain:retrain"])
def test_both_flows_take_every_knob_as_one_typed_parameter_with_a_described_form(entrypoint):
    import importlib

    from prefect.utilities.callables import parameter_schema

    module, name = entrypoint.split(":")
    schema = parameter_schema(getattr(importlib.import_module(module), name)).model_dump()
    params = schema["properties"]["params"]
    assert params["$ref"] == "#/definitions/TrainingParams" and params["description"]
    assert params["default"] == TrainingParams().model_dump(mode="json")
    form = schema["definitions"]["TrainingParams"]["properties"]
    assert list(form) == list(TrainingParams.model_fields)
    assert all(entry["title"] == knob and entry["description"] for knob, entry in form.items())
    assert form["pool"]["enum"] == ["max", "avg"] and form["padding"]["enum"] == ["zeros", "replicate"]
    assert "[default: auto: " in form["epochs"]["description"]


def _options(command: str) -> dict[str, click.Option]:
    command = cli.commands[command]
    return {option.name: option for option in command.get_params(click.Context(command))
            if isinstance(option, click.Option)}


@pytest.mark.parametrize("command", ["train", "retrain", "serve"])
def test_every_knob_is_an_option_with_train_configs_default(command):
    options = _options(command)
    help_text = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for name in (*KNOBS, *RUN_LEVEL):
        if (command, name) in (("serve", "resume"), ("train", "scratch_every")):
            continue  # a schedule resumes nothing; a single run is no nth retrain
        assert name in options, (command, name)
        declared = "--train-model" if (command, name) == ("serve", "model") else flag(name)
        assert declared in options[name].opts and declared in help_text, (command, name)
        if name in KNOBS and name != "resume":
            assert options[name].default == defaults[name], (command, name)


def test_train_options_reach_train_config(monkeypatch):
    import flows.train
    from cnnpipe.cli import training

    captured = {}

    def flow(dataset: str, params: TrainingParams) -> TrainingOutcome:
        captured.update(dataset=dataset, params=params)
        return TrainingOutcome(skipped="captured")

    monkeypatch.setattr(flows.train, "train", flow)
    monkeypatch.setattr(training, "before_flows", lambda: None)
    result = CliRunner().invoke(cli, ["train", "--dataset", "pets", "--pool", "avg", "--padding", "replicate",
                                      "--momentum", "0.8", "--weight-decay", "0", "--compile", "--resume",
                                      "--nproc", "2"])
    assert result.exit_code == 0 and result.output == "captured\n", result.output
    config = captured["params"].config("data")
    assert (config.pool, config.padding, config.momentum, config.weight_decay) == ("avg", "replicate", 0.8, 0.0)
    assert (config.compile, config.resume, config.epochs, captured["params"].nproc) == (True, True, None, 2)
    result = CliRunner().invoke(cli, ["train", "--dataset", "pets", "--resume", "/runs/a"])
    assert captured["params"].resume == "/runs/a"


def test_a_knob_out_of_range_or_choice_is_refused_in_one_line():
    result = CliRunner().invoke(cli, ["train", "--dataset", "pets", "--padding", "same"])
    assert result.exit_code == 2 and "'same' is not one of 'zeros', 'replicate'" in result.output
    result = CliRunner().invoke(cli, ["serve", "--dataset", "pets", "--momentum", "1"])
    assert result.exit_code == 1 and result.output == "Error: --momentum must be in [0, 1), not 1.0\n"


def test_serve_passes_what_differs_from_the_defaults_to_the_nightly_retraining(monkeypatch):
    import prefect

    import flows.serve

    built = {}
    monkeypatch.setattr(flows.serve, "build_deployments", lambda *args: built.setdefault("args", args) and [])
    monkeypatch.setattr(flows.serve, "serving_message", lambda deployments, api_url: "serving")
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **options: None)
    result = CliRunner().invoke(cli, ["serve", "--dataset", "pets", "--train-model", "alexnet", "--pool", "avg",
                                      "--registered-model", "pets"])
    assert result.exit_code == 0, result.output
    *_, model_ref, params = built["args"]
    assert model_ref == "pets@champion"
    assert params.model_dump(exclude_defaults=True) == {"model": "alexnet", "pool": "avg", "registered_model": "pets"}
