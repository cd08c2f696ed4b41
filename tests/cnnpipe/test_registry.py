"""The model registry on a real MLflow SQLite store: references, safe loading, the gate, history."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from cnn.layout import FORMAT
from cnn.predict import Predictor
from cnn.runs import evaluate_checkpoint
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import registry
from cnnpipe.predictions import champions
from cnnpipe.models.refs import ModelRef, parse_model_ref
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tests.imagefactory import write_class_folders

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("text", "expected"), [
    ("cnn-classifier@champion", ModelRef("cnn-classifier", alias="champion")),
    ("models:/cnn-classifier@challenger", ModelRef("cnn-classifier", alias="challenger")),
    ("cnn-classifier/12", ModelRef("cnn-classifier", version="12")),
    ("models:/pets/3", ModelRef("pets", version="3")),
    ("pets", ModelRef("pets", alias="champion")),
])
def test_model_references_in_mlflow_forms(text, expected):
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize("text", ["", "pets/latest", "pets@", "a b@champion", "pets/3/4"])
def test_malformed_references_are_refused_with_the_accepted_forms(text):
    with pytest.raises(CnnpipeError, match="NAME@ALIAS or NAME/VERSION"):
        parse_model_ref(text)


def _promotions() -> list[tuple]:
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        return connection.execute("SELECT from_version, to_version, from_value, to_value, reason FROM promotions "
                                  "ORDER BY promoted_at").fetchall()


def _gate(version, shapes_dataset, min_improvement=0.0):
    return champions.gate(registry.client(), version, float(version.tags["val_top1"]), shapes_dataset,
                         version.tags["dataset_version_id"], min_improvement)


def _champion(name: str) -> str:
    return str(registry.current_champion(registry.client(), name).version)


def test_gate_promotes_only_a_better_model(register_version, shapes_dataset):
    first = register_version("gated", 0.50)
    assert _gate(first, shapes_dataset).promoted and _champion("gated") == "1"

    worse = register_version("gated", 0.40)
    decision = _gate(worse, shapes_dataset)
    assert not decision.promoted and decision.champion_top1 == pytest.approx(0.50)
    assert _champion("gated") == "1"
    assert registry.client().get_model_version("gated", "2").tags["gate.decision"] == "rejected"
    assert str(registry.client().get_model_version_by_alias("gated", "challenger").version) == "2"

    equal = register_version("gated", 0.50)
    assert not _gate(equal, shapes_dataset).promoted  # a tie does not beat the champion

    better = register_version("gated", 0.60)
    assert _gate(better, shapes_dataset).promoted and _champion("gated") == "4"

    slightly = register_version("gated", 0.62)
    assert not _gate(slightly, shapes_dataset, min_improvement=0.05).promoted and _champion("gated") == "4"

    assert _promotions() == [(None, "1", None, pytest.approx(0.5), "first"),
                             ("1", "4", pytest.approx(0.5), pytest.approx(0.6), "better")]


def _balanced_split(root: Path, per_class: int = 100) -> Path:
    """A dataset folder holding only the manifest the gate reads: the shapes' 4 classes, `per_class`
    validation images each."""
    root.mkdir(parents=True, exist_ok=True)
    classes = ["circle", "cross", "square", "triangle"]
    (root / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "name": "shapes", "version_id": "v-balanced", "classes": classes, "files": [],
        "counts": {"train": {c: 5 * per_class for c in classes}, "val": {c: per_class for c in classes}}}))
    return root


def test_a_first_version_at_chance_is_not_crowned(register_version, tmp_path):
    dataset = _balanced_split(tmp_path / "balanced")
    at_chance = register_version("chance", 0.25)
    decision = _gate(at_chance, dataset)
    assert not decision.promoted and registry.current_champion(registry.client(), "chance") is None
    assert str(registry.client().get_model_version_by_alias("chance", "challenger").version) == "1"
    assert decision.reason == ("val top-1 0.2500 does not clearly beat the majority-class rate 0.2500 "
                               f"of 400 validation images (binomial p={decision.p_value:.2g} >= 0.01)")
    assert (decision.majority_rate, decision.val_images, decision.beats_majority) == (0.25, 400, False)
    assert decision.p_value > 0.4
    tags = registry.client().get_model_version("chance", "1").tags
    assert tags["gate.decision"] == "rejected" and tags["gate.reason"] == decision.reason
    assert float(tags["gate.majority_rate"]) == 0.25 and tags["gate.val_images"] == "400"
    assert tags["gate.val_split"] == "val" and tags["gate.val_correct"] == "100"
    assert float(tags["gate.p_value"]) == pytest.approx(decision.p_value, rel=1e-5)
    assert float(tags["gate.val_top1"]) == 0.25 and tags["gate.beats_majority"] == "false"

    slightly = register_version("chance", 0.2650)  # 106 of 400 right: could be luck
    decision = _gate(slightly, dataset)
    assert not decision.promoted and registry.current_champion(registry.client(), "chance") is None
    assert "does not clearly beat the majority-class rate 0.2500 of 400 validation images (binomial p=0.26" \
        in decision.reason


def test_a_clearly_better_first_version_is_crowned(register_version, tmp_path):
    dataset = _balanced_split(tmp_path / "balanced")
    decision = _gate(register_version("clear", 0.40), dataset)
    assert decision.promoted and _champion("clear") == "1" and decision.p_value < 1e-6
    assert decision.reason.startswith("first champion: val top-1 0.4000 clearly beats the majority-class rate 0.2500 "
                                      "of 400 validation images (binomial p=")
    tags = registry.client().get_model_version("clear", "1").tags
    assert tags["gate.decision"] == "promoted" and tags["gate.beats_majority"] == "true"
    assert _promotions() == [(None, "1", None, pytest.approx(0.40), "first")]


def test_beating_a_weak_champion_is_not_enough(register_version, tmp_path):
    dataset = _balanced_split(tmp_path / "balanced")
    register_version("weak", 0.20)
    champions.promote("weak", "1")  # by hand: the majority test applies only to the gate
    challenger = register_version("weak", 0.26)
    decision = _gate(challenger, dataset)
    assert not decision.promoted and _champion("weak") == "1" and decision.champion_top1 == pytest.approx(0.20)
    assert decision.reason.startswith("val top-1 0.2600 beats champion 1's 0.2000 (as recorded), but does not "
                                      "clearly beat the majority-class rate 0.2500 of 400 validation images")
    assert registry.client().get_model_version("weak", "2").tags["gate.decision"] == "rejected"
    assert str(registry.client().get_model_version_by_alias("weak", "challenger").version) == "2"

    strong = register_version("weak", 0.45)
    decision = _gate(strong, dataset)
    assert decision.promoted and _champion("weak") == "3"
    assert "and clearly beats the majority-class rate" in decision.reason
    assert [row[4] for row in _promotions()] == ["manual", "better"]


def test_models_command_shows_the_majority_figures(register_version, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cnnpipe.cli import cli

    monkeypatch.setenv("COLUMNS", "200")
    dataset = _balanced_split(tmp_path / "balanced")
    _gate(register_version("shown", 0.25), dataset)
    _gate(register_version("shown", 0.40), dataset)
    listing = CliRunner().invoke(cli, ["models", "shown"])
    assert listing.exit_code == 0, listing.output
    assert "vs majority" in listing.output
    rows = {line.split("│")[2].strip(): line for line in listing.output.splitlines() if "│ shown" in line}
    assert "25.00% of 400, p=0.52" in rows["1"] and "rejected" in rows["1"]
    assert "25.00% of 400, p=" in rows["2"] and "promoted" in rows["2"] and "champion" in rows["2"]
    assert ("shown/1 rejected: val top-1 0.2500 does not clearly beat the majority-class rate 0.2500 of 400 "
            "validation images") in listing.output
    assert "shown/2 promoted: first champion: val top-1 0.4000 clearly beats" in listing.output


def test_champion_is_re_evaluated_when_the_dataset_changed(register_version, shapes_dataset, shapes_checkpoints):
    # The champion claims 99% on an older dataset version; the gate measures it on the current one.
    champion = register_version("fair", 0.99, dataset_version_id="older-version", checkpoint=shapes_checkpoints[0])
    assert _gate(champion, shapes_dataset).promoted
    challenger = register_version("fair", 0.98)
    decision = _gate(challenger, shapes_dataset)
    measured = evaluate_checkpoint(shapes_checkpoints[0], shapes_dataset)["top1"]
    assert decision.champion_top1 == pytest.approx(measured) and measured < 0.98
    assert decision.promoted and "re-evaluated" in decision.reason


def test_manual_promotion_and_rollback_walk_the_history(register_version):
    for top1 in (0.5, 0.6, 0.7):
        register_version("manual", top1)
    for version in ("1", "3", "2"):
        champions.promote("manual", version)
    with pytest.raises(CnnpipeError, match="already the champion"):
        champions.promote("manual", "2")
    assert champions.rollback("manual").challenger == "3" and _champion("manual") == "3"
    assert champions.rollback("manual").challenger == "1" and _champion("manual") == "1"
    with pytest.raises(CnnpipeError, match="no earlier champion"):
        champions.rollback("manual")
    assert [row[4] for row in _promotions()] == ["manual", "manual", "manual", "rollback", "rollback"]
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        assert connection.execute("SELECT model_version FROM champions WHERE model_name = 'manual'").fetchone() == ("1",)


_PROMOTE = """
import sys
from cnnpipe.predictions import champions
champions.promote(sys.argv[1], sys.argv[2])
"""


def _promote_killed_after_its_commit(name: str, version: str) -> None:
    """`cnnpipe promote` killed -9 between committing its history row and checkpointing it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": get_settings().mlflow_tracking_uri,
           "FAILPOINT": "duckdb.after_commit", "FAILPOINT_ACTION": "kill"}
    killed = subprocess.run([sys.executable, "-c", _PROMOTE, name, version], env=env, capture_output=True, text=True,
                            timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def _damage_the_log() -> Path:
    database = get_settings().predictions_db
    wal = database.with_name(database.name + ".wal")
    assert wal.stat().st_size > 0
    # At three places: a log that holds one small transaction has spots where DuckDB takes eight bad
    # bytes for a torn write and drops the transaction unasked, rather than refusing the log.
    size = wal.stat().st_size
    with wal.open("r+b") as log:
        for quarter in (1, 2, 3):
            log.seek(size * quarter // 4)
            log.write(b"\xff" * 8)
    return database


def test_a_promotion_killed_before_its_checkpoint_changes_nothing_when_its_log_is_lost(register_version):
    for top1 in (0.5, 0.6):
        register_version("durable", top1)
    champions.promote("durable", "1")
    _promote_killed_after_its_commit("durable", "2")
    database = _damage_the_log()
    assert champions.champion_history("durable") == ["1"]  # the log was set aside...
    assert list(database.parent.glob("predictions.duckdb.wal.corrupt-*"))
    assert _champion("durable") == "1"  # ...and the alias never moved past the history
    champions.promote("durable", "2")
    assert champions.rollback("durable").challenger == "1" and _champion("durable") == "1"


def test_a_promotion_killed_before_its_alias_moved_is_taken_out_of_the_history(register_version, caplog):
    for top1 in (0.5, 0.6):
        register_version("interrupted", top1)
    champions.promote("interrupted", "1")
    _promote_killed_after_its_commit("interrupted", "2")
    assert _champion("interrupted") == "1"
    champions.promote("interrupted", "2")  # settles the interrupted move first, then makes it for real
    assert champions.champion_history("interrupted") == ["1", "2"] and _champion("interrupted") == "2"
    assert [row[:2] for row in _promotions()] == [(None, "1"), ("1", "2")]
    assert "interrupted before the alias moved" in caplog.text


def test_registered_model_predicts_like_its_checkpoint(register_version, shapes_checkpoints):
    import mlflow

    register_version("same", 0.5)
    champions.promote("same", "1")
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    from_registry = registry.load_predictor("same@champion")
    from_checkpoint = Predictor(shapes_checkpoints[-1])
    assert (from_registry.name, from_registry.version) == ("same", "1") and from_registry.run_id
    torch.testing.assert_close(from_registry.probabilities(images), from_checkpoint.probabilities(images))
    # The MLflow model itself (a pt2 export, no pickle) gives the same probabilities from normalised input.
    served = mlflow.pyfunc.load_model("models:/same/1")
    metadata = served.metadata.metadata
    assert metadata["classes"] == ["circle", "cross", "square", "triangle"]
    mean = torch.tensor(metadata["preprocessing"]["mean"])[:, None, None]
    std = torch.tensor(metadata["preprocessing"]["std"])[:, None, None]
    normalised = ((images.float() / 255 - mean) / std).numpy()
    # The exported model computes in fp32, whatever the machine; bf16 would differ by ~1e-3.
    in_fp32 = Predictor(shapes_checkpoints[-1], precision="fp32")
    torch.testing.assert_close(torch.from_numpy(served.predict(normalised)), in_fp32.probabilities(images),
                               atol=1e-5, rtol=1e-4)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _weights_in_store(name: str, version: str) -> Path:
    mlflow_client = registry.client()
    model_id = mlflow_client.get_model_version(name, version).source.removeprefix("models:/")
    location = mlflow_client.get_logged_model(model_id).artifact_location
    return Path(location.removeprefix("file://")) / "extra_files" / "weights.pt"


def test_a_tampered_weights_artifact_is_refused_and_runs_no_code(register_version, tmp_path):
    register_version("tampered", 0.5)
    marker = tmp_path / "payload-ran"
    weights = _weights_in_store("tampered", "1")
    weights.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    with pytest.raises(CnnpipeError, match=r"model tampered version 1: .*refused"):
        registry.load_predictor("tampered/1")
    assert not marker.exists()


def test_a_pickled_module_in_place_of_the_weights_is_refused(register_version, shapes_checkpoints):
    from cnn.runs import load_trained_model

    register_version("pickled", 0.5)
    model, _ = load_trained_model(shapes_checkpoints[-1])
    torch.save(model, _weights_in_store("pickled", "1"))  # a whole pickled object, as pickle-format models are
    with pytest.raises(CnnpipeError, match="model pickled version 1: .*refused"):
        registry.load_predictor("pickled/1")


def test_unknown_models_and_aliases_are_one_line_errors(register_version):
    register_version("known", 0.5)
    with pytest.raises(CnnpipeError, match="model known@champion: not in the registry"):
        registry.load_predictor("known@champion")  # registered, but never promoted
    with pytest.raises(CnnpipeError, match="model ghost/1: not in the registry"):
        registry.load_predictor("ghost/1")


def _register_and_gate(home: str, tracking_uri: str, checkpoint: str, dataset: str, val_top1: float,
                       barrier, results) -> None:
    import os

    os.environ["CNNPIPE_HOME"], os.environ["MLFLOW_TRACKING_URI"] = home, tracking_uri
    from cnn.train import FitResult
    from cnnpipe.models import registry, tracking

    version_id = json.loads((Path(dataset) / "manifest.json").read_text())["version_id"]
    tracking.connect()
    result = FitResult("", checkpoint, ["circle", "cross", "square", "triangle"], [], {}, "test", val_top1, 1, 0,
                       "cpu", version_id)
    with tracking.training_run("race", {}):
        version = tracking.log_model(result, "raced")
    registry.describe_version(registry.client(), version,
                              {"dataset": "shapes", "dataset_version_id": version_id, "val_top1": val_top1})
    barrier.wait(timeout=60)  # both versions exist; now both try to take the champion alias
    decision = champions.gate(registry.client(), version, val_top1, Path(dataset), version_id)
    results.put((str(version.version), val_top1, decision.promoted))


def test_concurrent_gates_leave_one_champion_on_the_better_model(cnnpipe_home, shapes_dataset, shapes_checkpoints):
    from cnnpipe.models import tracking

    tracking.connect()  # the store exists before the racers start, as a flow's first task makes sure
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_register_and_gate, args=(
        str(cnnpipe_home), get_settings().mlflow_tracking_uri, str(shapes_checkpoints[-1]), str(shapes_dataset),
        top1, barrier, results)) for top1 in (0.6, 0.7)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(180)
        assert racer.exitcode == 0
    outcomes = {version: (top1, promoted) for version, top1, promoted in (results.get() for _ in racers)}
    assert set(outcomes) == {"1", "2"}  # each used its own returned version
    better = next(version for version, (top1, _) in outcomes.items() if top1 == 0.7)
    assert _champion("raced") == better
    history = _promotions()
    # Either the better one came first and the other was rejected, or it replaced the first champion.
    assert history[-1][1] == better and len(history) in (1, 2)
    assert history[0][0] is None and all(row[0] == prev[1] for prev, row in zip(history, history[1:]))


def test_a_version_registered_before_monitoring_gets_its_reference_profile_on_demand(register_version,
                                                                                    shapes_dataset, monkeypatch,
                                                                                    tmp_path):
    import shutil

    import mlflow

    from cnn import runs
    from cnnpipe.monitoring.reference import ensure_reference_profile
    from cnnpipe.predictions.records import reference_temperature

    settings = get_settings()
    version = register_version("premonitoring", 0.5)
    assert reference_temperature(settings.predictions_db, "premonitoring", "1") is None
    assert not ensure_reference_profile("premonitoring", "1", settings)  # its dataset is not here
    shutil.copytree(shapes_dataset, settings.datasets_dir / "shapes")
    # Images added since it was trained must not enter its profile: it is derived on its own version.
    store = DatasetStore("shapes", settings)
    trained_on = store.manifest()["version_id"]
    write_class_folders(tmp_path / "later", {"circle": 30, "square": 30}, split="test")
    with store.lock():
        store.commit(store.stage(open_source(str(tmp_path / "later")), IngestOptions(workers=0)))
    assert store.manifest()["version_id"] != trained_on
    assert ensure_reference_profile("premonitoring", "1", settings)
    temperature = reference_temperature(settings.predictions_db, "premonitoring", "1")
    assert 0.05 < temperature < 20
    logged = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/monitoring/reference.json")
    assert logged["images"] == 80 and logged["temperature"] == pytest.approx(temperature)
    with duckdb.connect(str(settings.predictions_db), read_only=True) as connection:
        assert connection.execute("SELECT dataset_version FROM reference_profiles").fetchall() == [(trained_on,)]
    monkeypatch.setattr(runs, "profile_checkpoint", lambda *args, **kwargs: pytest.fail("derived twice"))
    assert ensure_reference_profile("premonitoring", "1", settings)
