"""The champion gate never takes a champion's score from another dataset: version ids of two
datasets could match (before they named the dataset and its labels), so a champion trained on
another dataset is measured on this one, or not compared at all."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cnn.layout import FORMAT
from cnnpipe.cli import cli
from cnnpipe.models import registry
from cnnpipe.predictions import champions

pytestmark = pytest.mark.slow


def _gate(version, dataset_dir, dataset_version_id):
    return champions.gate(registry.client(), version, float(version.tags["val_top1"]), dataset_dir, dataset_version_id)


def test_a_champion_trained_on_another_dataset_is_measured_on_this_one(register_version, shapes_dataset,
                                                                        shapes_checkpoints):
    shapes_id = json.loads((shapes_dataset / "manifest.json").read_text())["version_id"]
    # Its dataset held the shapes' images under other labels, which once gave it the shapes' version id.
    champion = register_version("crossed", 0.99, checkpoint=shapes_checkpoints[0])
    registry.describe_version(registry.client(), champion, {"dataset": "shapes-relabelled"})
    champions.promote("crossed", "1")
    decision = _gate(register_version("crossed", 0.98), shapes_dataset, shapes_id)
    assert decision.champion_top1 < 0.98 and decision.promoted  # its epoch-1 weights do not reach 99% here
    assert (f"(re-evaluated on dataset shapes version {shapes_id}, not dataset shapes-relabelled version "
            f"{shapes_id} it was trained on)") in decision.reason


def test_a_champion_that_cannot_be_measured_on_this_dataset_is_not_compared(register_version, tmp_path,
                                                                            monkeypatch):
    letters = tmp_path / "letters"
    letters.mkdir()
    classes = ["a", "b", "c", "d"]
    (letters / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "name": "letters", "version_id": "same-id", "classes": classes, "files": [],
        "counts": {"train": {c: 500 for c in classes}, "val": {c: 100 for c in classes}}}))
    register_version("lettered", 0.30, dataset_version_id="same-id")  # trained on the shapes
    champions.promote("lettered", "1")
    decision = _gate(register_version("lettered", 0.60, dataset_version_id="same-id"), letters, "same-id")
    assert not decision.promoted and decision.champion_top1 is None
    assert decision.reason == ("not comparable with champion 1, trained on dataset shapes version same-id: the model "
                               "knows classes ['circle', 'cross', 'square', 'triangle'], the dataset has "
                               "['a', 'b', 'c', 'd']; use `cnnpipe promote lettered 2` to switch anyway")

    monkeypatch.setenv("COLUMNS", "300")
    listing = CliRunner().invoke(cli, ["models", "lettered"])
    assert listing.exit_code == 0, listing.output
    assert f"lettered/2 rejected: {decision.reason}" in listing.output
