"""The drift views on a real trained model and real DuckDB, with seeded resampling: alerts stay
quiet on batches like the reference's and fire on shifted classes or inputs."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageFilter

from cnn import monitoring
from cnn.decoding import decode_images
from cnn.predict import Predictor
from cnnpipe.demo import SHAPES, encode, render_shape
from cnnpipe.predictions.classify import PART_SCHEMA
from cnnpipe.predictions.database import connect_for_writing, transaction
from cnnpipe.predictions.records import add_predictions, record_reference_profile
from cnnpipe.settings import get_settings

pytestmark = pytest.mark.slow

BATCH, RESAMPLES = 1000, 20
SHIFTS = {
    "blurred": lambda image, rng: image.filter(ImageFilter.GaussianBlur(3)),
    "darkened": lambda image, rng: Image.fromarray((np.asarray(image) * 0.35).astype(np.uint8)),
    "noisy": lambda image, rng: Image.fromarray(
        np.clip(np.asarray(image) + rng.normal(0, 90, np.asarray(image).shape), 0, 255).astype(np.uint8)),
}


@pytest.fixture(scope="module")
def trained(trained_on_shapes):
    """A model trained on the shapes with the automatic recipe, and its reference profile."""
    predictor = Predictor(trained_on_shapes.checkpoint, batch_size=256)
    predictor.temperature = trained_on_shapes.reference["temperature"]
    return predictor, trained_on_shapes.reference


def pool(predictor: Predictor, count: int, seed: int, shift=None) -> dict[str, np.ndarray]:
    """Predictions for `count` new shapes (JPEG and PNG, as the dataset has them), shifted or not."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(SHAPES), count)
    blobs = []
    for index, shape in enumerate(truth):
        image = render_shape(SHAPES[shape], rng)
        blobs.append(encode(shift(image, rng) if shift else image, "JPEG" if index % 2 else "PNG"))
    images = decode_images(blobs, 32)
    values, indices, calibrated, brightness, _ = predictor.top_k(images, 4).result()
    classes = predictor.classes
    return {"truth": np.array([classes.index(SHAPES[t]) for t in truth]), "images": images,
            "label": np.array([classes[row[0]] for row in indices]), "confidence": np.array([row[0] for row in values]),
            "calibrated": np.array(calibrated), "brightness": np.array(brightness)}


def held_out_profile(predictor: Predictor, reference: dict, count: int, seed: int) -> dict:
    """The profile `fit` keeps, on `count` held-out images rather than the shapes' 80: a dataset's
    test split is usually thousands of images, and a small one makes a noisy reference."""
    rows = pool(predictor, count, seed)
    return monitoring.reference_profile(predictor.probabilities(rows["images"]), torch.from_numpy(rows["truth"]),
                                        predictor.classes, reference["temperature"], [32] * count, [32] * count,
                                        monitoring.brightness(rows["images"]))


def insert_run(run_id: str, predictor: Predictor, rows: dict[str, np.ndarray]) -> None:
    count = len(rows["label"])
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    table = pa.table({
        "image_sha256": [f"{run_id}-{i}" for i in range(count)], "source_uri": ["inbox"] * count,
        "member_path": [f"{i}.png" for i in range(count)], "model_name": [predictor.name] * count,
        "model_version": [predictor.version] * count, "mlflow_run_id": [None] * count,
        "label": rows["label"].tolist(), "confidence": rows["confidence"].tolist(),
        "top5": [[{"label": label, "probability": p}] for label, p in zip(rows["label"], rows["confidence"])],
        "width": [32] * count, "height": [32] * count, "classify_run_id": [run_id] * count,
        "predicted_at": [now] * count, "calibrated_confidence": rows["calibrated"].tolist(),
        "brightness": rows["brightness"].tolist(), "embedding": [None] * count}, schema=PART_SCHEMA)
    with transaction(get_settings().predictions_db) as connection:
        connection.register("made", table)
        add_predictions(connection, "SELECT * FROM made")
        connection.execute("INSERT INTO classify_runs (classify_run_id, model_name, model_version, finished_at, "
                           "classified, rejected) VALUES (?, ?, ?, ?, ?, 0)",
                           [run_id, predictor.name, predictor.version, now, count])


def resample(rows: dict[str, np.ndarray], rng: np.random.Generator, favoured: int | None = None) -> dict:
    """A batch of BATCH drawn with replacement; with `favoured`, a third of it from that true class."""
    if favoured is None:
        picked = rng.integers(0, len(rows["label"]), BATCH)
    else:
        third = BATCH // 3
        of_class = np.flatnonzero(rows["truth"] == favoured)
        picked = np.concatenate([rng.choice(of_class, third), rng.integers(0, len(rows["label"]), BATCH - third)])
    return {key: values[picked] for key, values in rows.items() if key != "images"}


def test_alerts_are_quiet_in_distribution_and_fire_on_shifted_classes_or_inputs(trained):
    predictor, reference = trained
    assert reference["top1"] > 0.7, "the model must have learned the shapes for its drift to mean anything"
    record_reference_profile(get_settings().predictions_db, predictor.name, predictor.version, "v",
                             held_out_profile(predictor, reference, 2000, seed=6))
    rng = np.random.default_rng(0)
    clean = pool(predictor, 2000, seed=1)
    batches = {"clean": [resample(clean, rng) for _ in range(RESAMPLES)],
               "prior": [resample(clean, rng, favoured=index % len(SHAPES)) for index in range(RESAMPLES)]}
    for name, shift in SHIFTS.items():
        shifted = pool(predictor, 1000, seed=2, shift=shift)
        batches[name] = [resample(shifted, rng) for _ in range(RESAMPLES)]
    for kind, drawn in batches.items():
        for index, rows in enumerate(drawn):
            insert_run(f"{kind}-{index:02d}", predictor, rows)

    with connect_for_writing(get_settings().predictions_db) as connection:
        rates = dict(connection.execute(
            "SELECT split_part(classify_run_id, '-', 1), avg(CAST(alert AS DOUBLE)) FROM drift_by_run "
            "GROUP BY ALL").fetchall())
        psi_range = connection.execute("SELECT split_part(classify_run_id, '-', 1), min(psi), max(psi), "
                                       "any_value(psi_limit) FROM drift_by_run GROUP BY ALL").fetchall()
        clean_figures = connection.execute(
            "SELECT avg(psi), avg(js_distance), avg(estimated_accuracy), avg(abs(brightness_shift)) "
            "FROM drift_by_run WHERE classify_run_id LIKE 'clean-%'").fetchone()
        daily = connection.execute("SELECT count(*), sum(images) FROM drift_daily").fetchone()
    assert rates["clean"] <= 0.05, (rates, psi_range)
    assert all(rates[kind] >= 0.95 for kind in ("prior", *SHIFTS)), (rates, psi_range)
    psi, js_distance, estimated, brightness_shift = clean_figures
    assert psi < 0.1 and js_distance < 0.1 and brightness_shift < 0.05
    # Calibrated confidence estimates the accuracy the batch really has, without its labels.
    measured = float(np.mean(clean["label"] == np.array(predictor.classes)[clean["truth"]]))
    assert estimated == pytest.approx(measured, abs=0.06)
    assert daily == (1, BATCH * RESAMPLES * (2 + len(SHIFTS)))

    # Against fit's own profile of the shapes' 80 test images, chance moves PSI further: the limit
    # rises with it, so in-distribution batches still stay quiet.
    record_reference_profile(get_settings().predictions_db, predictor.name, predictor.version, "v", reference)
    with connect_for_writing(get_settings().predictions_db) as connection:
        small = connection.execute("SELECT avg(CAST(alert AS DOUBLE)), min(psi_limit) FROM drift_by_run "
                                   "WHERE classify_run_id LIKE 'clean-%'").fetchone()
    assert small[0] <= 0.05 and small[1] > 0.15, small


def test_a_classify_run_that_drifted_emits_the_event_a_retraining_trigger_waits_for(trained, prefect_harness,
                                                                                   monkeypatch):
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from cnnpipe.predictions.classify import ClassifySummary
    from tasks.classify import monitor_drift

    predictor, reference = trained
    record_reference_profile(get_settings().predictions_db, predictor.name, predictor.version, "v", reference)
    rng = np.random.default_rng(3)
    insert_run("quiet", predictor, resample(pool(predictor, 1000, seed=4), rng))
    insert_run("dark", predictor, resample(pool(predictor, 1000, seed=5, shift=SHIFTS["darkened"]), rng))
    worker = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)
    quiet = monitor_drift.fn(ClassifySummary("inbox", predictor.name, predictor.version, "quiet"))
    dark = monitor_drift.fn(ClassifySummary("inbox", predictor.name, predictor.version, "dark"))
    worker.drain()
    assert not quiet["alert"] and dark["alert"] and dark["brightness_shift"] < -0.1
    resource = f"cnnpipe.model.{predictor.name}.{predictor.version}"
    emitted = [event for client in AssertingEventsClient.all for event in client.events
               if event.event == "cnnpipe.model.drift" and event.resource.id == resource]
    assert len(emitted) == 1 and emitted[0].payload["classify_run_id"] == "dark"
    # Its artifact shows the figures and one picture: class shares and confidence against the reference.
    from prefect.artifacts import Artifact

    assert "data:image/png;base64," in Artifact.get("classify-drift").data
    assert (get_settings().reports_dir / "drift" / "dark.png").read_bytes().startswith(b"\x89PNG")
    drawn = dark["distributions"]
    assert [(label, reference_share) for label, _, reference_share in drawn["classes"]] == \
        [(row["label"], pytest.approx(row["predicted_share"])) for row in sorted(reference["classes"],
                                                                                   key=lambda row: row["label"])]
    assert sum(share for _, share, _ in drawn["classes"]) == pytest.approx(1)
    assert sum(share for _, _, share, _ in drawn["bins"]) == pytest.approx(1)
    assert monitor_drift.fn(ClassifySummary("inbox", "no-reference", "1", "other")) is None

    from click.testing import CliRunner

    from cnnpipe.cli import cli

    shown = CliRunner().invoke(cli, ["monitor", "--model", predictor.name, "--format", "csv"])
    assert shown.exit_code == 0, shown.output
    rows = [line.split(",") for line in shown.output.strip().splitlines()]
    assert rows[0][0] == "classify_run_id" and rows[0][-1] == "alert"
    assert {(row[0], row[-1]) for row in rows[1:]} >= {("quiet", "False"), ("dark", "True")}
    assert CliRunner().invoke(cli, ["monitor", "--model", "nobody"]).output.startswith("No drift to show")
