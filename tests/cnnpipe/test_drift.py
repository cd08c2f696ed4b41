"""The drift views on a real trained model and real DuckDB, with seeded resampling: alerts stay
quiet on batches like the reference's and fire on shifted classes or inputs; and the embedding
shift's chance limit on synthetic embeddings."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageFilter

from bench import embedding_drift
from cnn import monitoring
from cnn.config import EMBEDDING_DIM
from cnn.predict import Predictor
from cnnpipe.demo import SHAPES
from cnnpipe.predictions.database import connect_for_writing, set_drift_thresholds, transaction
from cnnpipe.predictions.records import add_predictions, record_reference_profile
from cnnpipe.predictions.summary import DEFAULT_THRESHOLDS
from cnnpipe.settings import get_settings
from tests.cnnpipe.test_summary import LEGACY_GRAIN

pytestmark = pytest.mark.slow

BATCH, RESAMPLES = 1000, 20
THRESHOLDS = {metric: threshold for metric, (threshold, _) in DEFAULT_THRESHOLDS.items()}
SHIFTS = {
    "blurred": lambda image, rng: image.filter(ImageFilter.GaussianBlur(3)),
    "darkened": lambda image, rng: Image.fromarray((np.asarray(image) * 0.35).astype(np.uint8)),
    "noisy": lambda image, rng: Image.fromarray(
        np.clip(np.asarray(image) + rng.normal(0, 90, np.asarray(image).shape), 0, 255).astype(np.uint8)),
}
# Shapes in grey: the model labels them as well and as confidently, their brightness is the same,
# and only their embeddings show that the camera changed.
UNSEEN_SHIFT = lambda image, rng: image.convert("L").convert("RGB")  # noqa: E731


@pytest.fixture(scope="module")
def trained(trained_on_shapes):
    """A model trained on the shapes with the automatic recipe, and its reference profile."""
    predictor = Predictor(trained_on_shapes.checkpoint, batch_size=256)
    predictor.temperature = trained_on_shapes.reference["temperature"]
    return predictor, trained_on_shapes.reference


pool = embedding_drift.pool  # new shapes, shifted or not, and what the model makes of them


def held_out_profile(predictor: Predictor, reference: dict, count: int, seed: int) -> dict:
    """The profile `fit` keeps, on `count` held-out images rather than the shapes' 80: a dataset's
    test split is usually thousands of images, and a small one makes a noisy reference."""
    rows = pool(predictor, count, seed)
    profile = monitoring.reference_profile(predictor.probabilities(rows["images"]), torch.from_numpy(rows["truth"]),
                                           predictor.classes, reference["temperature"], [32] * count, [32] * count,
                                           monitoring.brightness(rows["images"]))
    return profile | {"embedding": monitoring.embedding_reference(torch.from_numpy(rows["embedding"]))}


def insert_runs(predictor: Predictor, runs: dict[str, dict[str, np.ndarray]]) -> None:
    """Classify runs (id: their rows), in one transaction: the views see them as if each ran alone."""
    embedding_drift.insert_runs(get_settings().predictions_db, predictor, runs)


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
    for name, shift in (*SHIFTS.items(), ("grey", UNSEEN_SHIFT)):
        shifted = pool(predictor, 1000, seed=2, shift=shift)
        batches[name] = [resample(shifted, rng) for _ in range(RESAMPLES)]
    insert_runs(predictor, {f"{kind}-{index:02d}": rows for kind, drawn in batches.items()
                            for index, rows in enumerate(drawn)})

    alerts = {figure: f"avg(CAST(coalesce({condition}, false) AS DOUBLE))" for figure, condition in (
        ("any", "alert"), ("psi", "psi > psi_limit"),
        ("confidence", f"-confidence_shift > {THRESHOLDS['confidence_drop']}"),
        ("low_confidence", f"low_confidence_shift > {THRESHOLDS['low_confidence_rise']}"),
        ("brightness", f"abs(brightness_shift) > {THRESHOLDS['brightness_shift']}"),
        ("embedding", "embedding_shift > embedding_shift_limit"))}
    with connect_for_writing(get_settings().predictions_db) as connection:
        by_figure = {kind: dict(zip(alerts, rates)) for kind, *rates in connection.execute(
            f"SELECT split_part(classify_run_id, '-', 1), {', '.join(alerts.values())} FROM drift_by_run "
            "GROUP BY ALL").fetchall()}
        rates = {kind: figures["any"] for kind, figures in by_figure.items()}
        psi_range = connection.execute("SELECT split_part(classify_run_id, '-', 1), min(psi), max(psi), "
                                       "any_value(psi_limit) FROM drift_by_run GROUP BY ALL").fetchall()
        clean_figures = connection.execute(
            "SELECT avg(psi), avg(js_distance), avg(estimated_accuracy), avg(abs(brightness_shift)) "
            "FROM drift_by_run WHERE classify_run_id LIKE 'clean-%'").fetchone()
        daily = connection.execute("SELECT count(*), sum(images) FROM drift_daily").fetchone()
    assert rates["clean"] <= 0.05, (rates, psi_range)
    quiet = {kind: rates[kind] for kind in ("prior", *SHIFTS) if rates[kind] < 0.95}
    assert not quiet, (quiet, by_figure)
    # Grey shapes pass every figure but their embeddings, which move further than in any like batch.
    # How far depends on how much colour the model uses: past the chance limit, not always past the
    # default threshold (bench/embedding_drift.py measures that), so here the limit alone decides.
    grey = by_figure["grey"]
    assert not any(grey[figure] for figure in ("psi", "confidence", "low_confidence", "brightness")), grey
    assert by_figure["clean"]["embedding"] <= 0.05, by_figure
    set_drift_thresholds(get_settings().predictions_db, ["embedding_shift=0"])
    with connect_for_writing(get_settings().predictions_db) as connection:
        past_chance = dict(connection.execute(
            "SELECT split_part(classify_run_id, '-', 1), avg(CAST(embedding_shift > embedding_shift_limit AS DOUBLE)) "
            "FROM drift_by_run GROUP BY ALL").fetchall())
        nearest_grey, farthest_clean = connection.execute(
            "SELECT min(embedding_shift) FILTER (classify_run_id LIKE 'grey-%'), "
            "max(embedding_shift) FILTER (classify_run_id LIKE 'clean-%') FROM drift_by_run").fetchone()
    assert past_chance["grey"] >= 0.95 and past_chance["clean"] <= 0.05, past_chance
    assert nearest_grey > farthest_clean
    psi, js_distance, estimated, brightness_shift = clean_figures
    assert psi < 0.1 and js_distance < 0.1 and brightness_shift < 0.05
    # Calibrated confidence estimates the accuracy the batch really has, without its labels.
    measured = float(np.mean(clean["label"] == np.array(predictor.classes)[clean["truth"]]))
    assert estimated == pytest.approx(measured, abs=0.06)
    assert daily == (1, BATCH * RESAMPLES * (3 + len(SHIFTS)))

    # Against fit's own profile of the shapes' 80 test images, chance moves PSI and the mean
    # embedding further: their limits rise with it, so in-distribution batches still stay quiet.
    assert reference["embedding"]["images"] == reference["images"] == 80
    record_reference_profile(get_settings().predictions_db, predictor.name, predictor.version, "v", reference)
    with connect_for_writing(get_settings().predictions_db) as connection:
        small = connection.execute("SELECT avg(CAST(alert AS DOUBLE)), min(psi_limit), min(embedding_shift_limit) "
                                   "FROM drift_by_run WHERE classify_run_id LIKE 'clean-%'").fetchone()
    assert small[0] <= 0.05 and small[1] > 0.15 and small[2] > 0.14, small


def test_a_classify_run_that_drifted_emits_the_event_a_retraining_trigger_waits_for(trained, prefect_harness,
                                                                                   monkeypatch):
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from cnnpipe.predictions.classify import ClassifySummary
    from tasks.classify import monitor_drift

    predictor, reference = trained
    record_reference_profile(get_settings().predictions_db, predictor.name, predictor.version, "v", reference)
    rng = np.random.default_rng(3)
    insert_runs(predictor, {"quiet": resample(pool(predictor, 1000, seed=4), rng),
                            "dark": resample(pool(predictor, 1000, seed=5, shift=SHIFTS["darkened"]), rng)})
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

    report = Artifact.get("classify-drift").data
    assert "data:image/png;base64," in report
    assert f"| embedding shift (reference standard deviations) | {dark['embedding_shift']:.3f} |" in report
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


# Principal components, each with less spread than the one before; the last four are dimensions
# no image varies along (a projection fitted on fewer features than it has dimensions).
SPREAD = np.concatenate([np.geomspace(4.0, 0.02, EMBEDDING_DIM - 4), np.zeros(4)])


def embedded(rng: np.random.Generator, count: int, shift: float = 0.0) -> np.ndarray:
    """`count` embeddings like the reference's, the first two dimensions moved by `shift` of their spread."""
    vectors = rng.normal(0, 1, (count, EMBEDDING_DIM)) * SPREAD
    vectors[:, :2] += shift * SPREAD[:2]
    return vectors.astype(np.float32)


def synthetic_profile(embeddings: np.ndarray | None) -> dict:
    """A reference profile that matches the synthetic batches in every figure, embeddings aside."""
    profile = {"images": 2000, "temperature": 1.0, "top1": 0.9, "mean_confidence": 0.9, "low_confidence_share": 0.0,
               "width": {"mean": 32}, "height": {"mean": 32}, "brightness": {"mean": 0.5, "std": 0.1},
               "classes": [{"label": "a", "predicted_share": 1.0, "true_share": 1.0}],
               "confidence_bins": [{"low": 0.0, "high": 1.0, "share": 1.0, "accuracy": 0.9}]}
    if embeddings is not None:
        profile["embedding"] = monitoring.embedding_reference(torch.from_numpy(embeddings))
    return profile


def insert_synthetic_runs(version: str, runs: dict[str, np.ndarray]) -> None:
    """Classify runs (RUN-VERSION) of predictions alike in all but their embeddings, in one transaction."""
    count = sum(len(vectors) for vectors in runs.values())
    run_ids = np.repeat([f"{run}-{version}" for run in runs], [len(vectors) for vectors in runs.values()]).tolist()
    vectors = np.concatenate(list(runs.values()))
    table = pa.table({
        "image_sha256": [f"{version}-{i}" for i in range(count)], "source_uri": ["inbox"] * count,
        "member_path": ["x.png"] * count, "model_name": ["m"] * count, "model_version": [version] * count,
        "mlflow_run_id": pa.nulls(count, pa.string()),
        "label": ["a"] * count, "confidence": [0.9] * count, "top5": [[{"label": "a", "probability": 0.9}]] * count,
        "width": [32] * count, "height": [32] * count, "classify_run_id": run_ids,
        "predicted_at": [datetime(2026, 12, 1, tzinfo=timezone.utc)] * count, "calibrated_confidence": [0.9] * count,
        "brightness": [0.5] * count,
        "embedding": pa.ListArray.from_arrays(np.arange(0, count * EMBEDDING_DIM + 1, EMBEDDING_DIM, dtype=np.int32),
                                              pa.array(vectors.ravel()))})
    with transaction(get_settings().predictions_db) as connection:
        connection.register("made", table)
        add_predictions(connection, "SELECT * FROM made")
        connection.executemany("INSERT INTO classify_runs (classify_run_id, model_name, model_version, finished_at, "
                               "classified, rejected) VALUES (?, 'm', ?, ?, ?, 0)",
                               [[f"{run}-{version}", version, datetime(2026, 12, 1, tzinfo=timezone.utc),
                                 len(runs[run])] for run in runs])


def test_embedding_shift_stays_within_chance_on_like_batches_and_passes_it_on_a_small_shift():
    """Synthetic embeddings, no model: the statistic as numpy computes it, its chance limit for a
    large and a small reference, the threshold, NULL without reference embeddings, and an older
    database whose summary lacks the embedding sums."""
    rng = np.random.default_rng(0)
    database = get_settings().predictions_db
    large, small = embedded(rng, 2000), embedded(rng, 80)
    for version, reference in (("large", large), ("small", small), ("before", None)):
        record_reference_profile(database, "m", version, "v", synthetic_profile(reference))
    # Chance alone decides here: with no threshold above it, only the limit keeps like batches quiet.
    set_drift_thresholds(database, ["embedding_shift=0"])
    like = {f"like-{i:02d}": embedded(rng, 500) for i in range(RESAMPLES)}
    # 0.4 of a spread on two of 60 dimensions: a root mean square shift of 0.073 (0.088 with the
    # batch's own noise), under the default threshold of 0.1 but above what chance reaches between
    # 500 and 2,000 images (0.064).
    insert_synthetic_runs("large", like | {f"moved-{i:02d}": embedded(rng, 500, shift=0.4) for i in range(RESAMPLES)})
    insert_synthetic_runs("small", like)
    insert_synthetic_runs("before", {"like-00": like["like-00"]})

    def figures() -> list[tuple]:
        with connect_for_writing(database) as connection:
            return connection.execute(
                "SELECT model_version, split_part(classify_run_id, '-', 1) AS kind, avg(CAST(alert AS DOUBLE)), "
                "min(embedding_shift), max(embedding_shift), min(embedding_shift_limit), count(*) FROM drift_by_run "
                "GROUP BY ALL ORDER BY ALL").fetchall()

    rates = {(version, kind): (rate, limit) for version, kind, rate, _, _, limit, _ in figures()}
    assert rates[("large", "like")][0] <= 0.05 and rates[("large", "moved")][0] >= 0.95, rates
    assert rates[("small", "like")][0] <= 0.05, rates
    # sqrt(chi-square quantile / 60 * (1/n + 1/m)): a reference of 80 images raises the limit 2.4 times.
    assert rates[("large", "like")][1] == pytest.approx(0.0644, abs=0.0001)
    assert rates[("small", "like")][1] == pytest.approx(0.1552, abs=0.0001)
    assert rates[("before", "like")] == (0.0, None)

    varying = SPREAD > 0
    batch, reference = like["like-00"][:, varying].astype(np.float64), large[:, varying].astype(np.float64)
    standardised = (batch.mean(0) - reference.mean(0)) / reference.std(0)
    with connect_for_writing(database) as connection:
        shift, daily = connection.execute(
            "SELECT (SELECT embedding_shift FROM drift_by_run WHERE model_version = 'large' AND classify_run_id = "
            "'like-00-large'), (SELECT embedding_shift FROM drift_daily WHERE model_version = 'before')").fetchone()
    assert shift == pytest.approx(np.sqrt(np.mean(standardised ** 2)), rel=1e-6)
    assert daily is None

    # A database from before the summary kept embedding sums gets them back from its embeddings.
    before = figures()
    with connect_for_writing(database) as connection:
        connection.execute("DROP TABLE run_summary; DROP TABLE daily_summary")
        connection.execute(LEGACY_GRAIN.format(embeddings=""))
    assert figures() == [tuple(pytest.approx(value) if isinstance(value, float) else value for value in row)
                         for row in before]
    set_drift_thresholds(database, ["embedding_shift=0.1"])  # the default: 0.09 is a shift too small to matter
    assert {kind: rate for version, kind, rate, *_ in figures() if version == "large"} == {"like": 0.0, "moved": 0.0}
