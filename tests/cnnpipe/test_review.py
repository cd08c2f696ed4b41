"""The review loop on real parts: predictions in DuckDB from a trained model, images re-read from a
folder and a tar.gz, the store as fallback, and labels.csv ingested back into a dataset."""

from __future__ import annotations

import csv
import hashlib
import shutil
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from cnn.monitoring import embedding_reference
from cnn.predict import Predictor
from cnnpipe.demo import SHAPES, encode, render_shape
from cnnpipe.errors import CnnpipeError
from cnnpipe.monitoring.review import choose, export_for_review
from cnnpipe.predictions.classify import classify_source
from cnnpipe.predictions.database import connect_for_writing, set_drift_thresholds, transaction
from cnnpipe.predictions.records import record_reference_profile
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tasks.ingest import record_labels

pytestmark = pytest.mark.slow


def write_shapes(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        (folder / shape).mkdir(parents=True, exist_ok=True)
        (folder / shape / f"{seed}-{index}.png").write_bytes(encode(render_shape(shape, rng), "PNG"))


def classify(source: Path, checkpoint: Path, version: str, run_id: str) -> None:
    settings = get_settings()
    classify_source(open_source(str(source)), Predictor(checkpoint, name="shapes", version=version),
                    settings.predictions_db, settings.staging_dir, run_id)


def rows_of(sql: str, parameters: list | None = None) -> list[tuple]:
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        return connection.execute(sql, parameters or []).fetchall()


def read_labels(folder: Path) -> list[dict]:
    with open(folder / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def classified(tmp_path, shapes_checkpoints) -> dict[str, Path]:
    """40 new shapes in a folder and 40 in a tar.gz, classified by versions 1 and 2 (after one and
    two epochs, so they are unsure of many and disagree on some)."""
    inbox, packed = tmp_path / "inbox", tmp_path / "packed"
    write_shapes(inbox, 40, seed=101)
    write_shapes(packed, 40, seed=202)
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(packed, arcname=".")
    for version, checkpoint in (("1", shapes_checkpoints[0]), ("2", shapes_checkpoints[-1])):
        for source in (inbox, archive):
            classify(source, checkpoint, version, f"run-{version}-{source.name}")
    return {"inbox": inbox, "archive": archive}


def test_low_confidence_exports_the_least_confident_unlabelled_images_from_their_sources(classified, tmp_path):
    database = get_settings().predictions_db
    unsure = rows_of("SELECT image_sha256, coalesce(calibrated_confidence, confidence) AS c FROM predictions "
                     "WHERE model_version = '1' AND c < 0.5 ORDER BY c, image_sha256")
    assert len(unsure) > 5, "one epoch left too few unsure predictions to choose from"
    labelled = unsure[0][0]
    with transaction(database) as connection:
        connection.execute("INSERT INTO ground_truth VALUES (?, 'circle', 'reviewed', 'v1', now())", [labelled])

    chosen = choose(database, "shapes/1", "low-confidence", limit=5)
    assert [row["image_sha256"] for row in chosen] == [sha for sha, _ in unsure[1:6]]

    out = tmp_path / "review"
    export = export_for_review(chosen, out, get_settings())
    assert (export.from_source, export.from_store, export.unavailable) == (5, 0, [])
    listed = read_labels(out)
    assert [row["sha256"] for row in listed] == [row["image_sha256"] for row in chosen]
    assert [row["label"] for row in listed] == [row["predicted"] for row in listed] == [row["label"] for row in chosen]
    assert all(float(row["confidence"]) < 0.5 for row in listed)
    # What `cnnpipe ingest` reads back: every listed image, hashing to the prediction's image.
    entries = list(open_source(str(out / "labels.csv")).entries())
    assert [hashlib.sha256(entry.data).hexdigest() for entry in entries] == [row["sha256"] for row in listed]
    assert all(entry.reject_reason is None for entry in entries)
    # A second export into the folder would overwrite a person's corrections: refused in one line.
    with pytest.raises(CnnpipeError, match="labels.csv already exists"):
        export_for_review(chosen, out, get_settings())


def test_disagreements_are_the_images_other_versions_label_otherwise(classified, tmp_path):
    expected = rows_of("SELECT DISTINCT a.image_sha256 FROM predictions a JOIN predictions b USING (image_sha256) "
                       "WHERE a.model_version = '2' AND b.model_version = '1' AND a.label <> b.label")
    chosen = choose(get_settings().predictions_db, "shapes/2", "disagreements", limit=1000)
    assert sorted(row["image_sha256"] for row in chosen) == sorted(sha for (sha,) in expected)
    confidences = [row["confidence"] for row in chosen]
    assert confidences == sorted(confidences)


def test_a_gone_or_changed_source_falls_back_to_the_store_else_says_why(classified, tmp_path):
    settings = get_settings()
    store = DatasetStore("kept", settings)
    with store.lock():  # the archive's images were also ingested; the inbox's were not
        store.commit(store.stage(open_source(str(classified["archive"])), IngestOptions(workers=0)))
    chosen = choose(settings.predictions_db, "shapes/1", "low-confidence", limit=1000)
    in_inbox = [row for row in chosen if row["source_uri"].endswith("inbox")]
    assert in_inbox and len(in_inbox) < len(chosen)
    changed = classified["inbox"] / in_inbox[0]["member_path"]
    changed.write_bytes(b"another image now")
    classified["archive"].unlink()

    export = export_for_review(chosen, tmp_path / "review", settings)
    assert export.from_store == len(chosen) - len(in_inbox)
    assert export.from_source == len(in_inbox) - 1
    assert [(row["member_path"], row["reason"].split(",")[0]) for row in export.unavailable] == \
        [(in_inbox[0]["member_path"], "changed in its source since it was classified")]
    listed = read_labels(tmp_path / "review")
    assert len(listed) == len(chosen) - 1
    for row in listed:
        data = (tmp_path / "review" / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]

    shutil.rmtree(classified["inbox"])
    again = export_for_review(chosen, tmp_path / "again", settings)
    assert again.from_source == 0 and again.from_store == len(chosen) - len(in_inbox)
    assert {row["reason"].split(" (")[0] for row in again.unavailable} == {"its source is gone"}
    with open(tmp_path / "again" / "unavailable.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(in_inbox)


def test_corrected_labels_ingested_back_are_scored_by_production_accuracy(classified, tmp_path):
    settings = get_settings()
    out = tmp_path / "review"
    chosen = choose(settings.predictions_db, "shapes/2", "low-confidence", limit=8)
    export_for_review(chosen, out, settings)
    listed = read_labels(out)
    truth = {}
    for row in listed:  # a person corrects the label column to what each image shows
        row["label"] = truth[row["sha256"]] = Path(row["member_path"]).parent.name
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(listed[0]))
        writer.writeheader()
        writer.writerows(listed)

    store = DatasetStore("reviewed", settings)
    with store.lock():
        summary = store.commit(store.stage(open_source(str(out / "labels.csv")), IngestOptions(workers=0)))
    assert summary.added == len(listed) and not summary.rejected
    assert record_labels.fn("reviewed") == len(listed)

    right = sum(truth[row["image_sha256"]] == row["label"] for row in chosen)
    measured = rows_of("SELECT sum(labelled), sum(top1 * labelled) FROM production_accuracy WHERE model_name = "
                       "'shapes' AND model_version = '2'")
    assert measured[0][0] == len(listed) and round(measured[0][1]) == right
    assert choose(settings.predictions_db, "shapes/2", "low-confidence", limit=8) != chosen  # labelled now


def test_the_command_says_what_it_wrote_and_refuses_to_overwrite_corrections(classified, tmp_path):
    from click.testing import CliRunner

    from cnnpipe.cli import cli

    out = tmp_path / "review"
    first = CliRunner().invoke(cli, ["review", "export", str(out), "--model", "shapes/1", "--limit", "3"])
    assert first.exit_code == 0, first.output
    assert "Wrote 3 image(s)" in first.output and f"cnnpipe ingest {out / 'labels.csv'}" in first.output
    assert len(read_labels(out)) == 3
    again = CliRunner().invoke(cli, ["review", "export", str(out), "--model", "shapes/1"])
    assert again.exit_code == 1 and again.output.count("\n") == 1 and "already exists" in again.output
    unknown = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "none"), "--model", "shapes/9"])
    assert unknown.exit_code == 0 and unknown.output.startswith("Nothing to review: shapes/9 has no low-confidence")
    assert not (tmp_path / "none").exists()


def test_a_model_reference_the_database_cannot_resolve_is_one_line(tmp_path):
    database = get_settings().predictions_db
    connect_for_writing(database).close()
    with pytest.raises(CnnpipeError, match="NAME@champion"):
        choose(database, "shapes@staging", "low-confidence", limit=5)
    assert choose(database, "shapes@champion", "low-confidence", limit=5) == []


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under a folder, links not followed: a file's bytes, a link's target, a folder as itself.
    Leaves out the predictions, which choosing opens and may rewrite: none of the export's business."""
    return {str(path.relative_to(folder)): str(path.readlink()) if path.is_symlink()
            else path.read_bytes() if path.is_file() else "dir"
            for path in sorted(folder.rglob("*")) if "predictions.duckdb" not in path.name}


def test_the_command_refuses_a_folder_in_the_home_or_a_symlink_it_would_write_through(classified, tmp_path,
                                                                                      cnnpipe_home):
    from click.testing import CliRunner

    from cnnpipe.cli import cli

    def export(out: Path):
        return CliRunner().invoke(cli, ["review", "export", str(out), "--model", "shapes/1", "--limit", "3"])

    datasets = cnnpipe_home / "datasets"
    (datasets / "kept").mkdir(parents=True)
    (datasets / "kept" / "manifest.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.png").write_bytes(b"not an export")

    into_datasets = tmp_path / "into-datasets"
    into_datasets.symlink_to(datasets)
    images_elsewhere = tmp_path / "images-elsewhere"
    images_elsewhere.mkdir()
    (images_elsewhere / "images").symlink_to(elsewhere)
    image_elsewhere = tmp_path / "image-elsewhere"
    (image_elsewhere / "images").mkdir(parents=True)
    chosen = choose(get_settings().predictions_db, "shapes/1", "low-confidence", limit=3)
    (image_elsewhere / "images" / f"{chosen[0]['image_sha256'][:16]}.png").symlink_to(elsewhere / "precious.png")
    labels_elsewhere = tmp_path / "labels-elsewhere"
    labels_elsewhere.mkdir()
    (labels_elsewhere / "labels.csv").symlink_to(elsewhere / "labels.csv")

    refusals = {cnnpipe_home / "x": "inside CNNPIPE_HOME",
                tmp_path / "elsewhere" / ".." / "cnnpipe-home" / "reports": "inside CNNPIPE_HOME",
                into_datasets: "inside CNNPIPE_HOME",
                images_elsewhere: f"{images_elsewhere / 'images'} is a symlink",
                image_elsewhere: f"{image_elsewhere / 'images' / chosen[0]['image_sha256'][:16]}.png is a symlink",
                labels_elsewhere: f"{labels_elsewhere / 'labels.csv'} is a symlink"}
    before = snapshot(tmp_path)  # the home, the folders refused and where their links lead
    for out, reason in refusals.items():
        refused = export(out)
        assert refused.exit_code == 1 and refused.output.count("\n") == 1, (out, refused.output)
        assert reason in refused.output, refused.output
    nothing_chosen = CliRunner().invoke(cli, ["review", "export", str(cnnpipe_home / "x"), "--model", "shapes/9"])
    assert nothing_chosen.exit_code == 1 and "inside CNNPIPE_HOME" in nothing_chosen.output  # refused first
    assert snapshot(tmp_path) == before


def test_outliers_are_the_images_farthest_from_the_reference_embeddings_farthest_first(classified, tmp_path):
    from click.testing import CliRunner

    from cnnpipe.cli import cli

    settings = get_settings()
    # Version 2's reference: the embeddings of the inbox's shapes, as fit keeps those of its held-out images.
    vectors = {sha: np.array(vector, dtype=np.float64)
               for sha, vector in rows_of("SELECT image_sha256, embedding FROM embeddings WHERE model_version = '2'")}
    inbox = [sha for (sha,) in rows_of("SELECT image_sha256 FROM predictions WHERE model_version = '2' AND "
                                       "source_uri LIKE '%inbox'")]
    reference = embedding_reference(torch.tensor(np.stack([vectors[sha] for sha in inbox])))
    record_reference_profile(settings.predictions_db, "shapes", "2", "v", {
        "images": len(inbox), "temperature": 1.0, "top1": 1.0, "mean_confidence": 0.9, "low_confidence_share": 0.1,
        "width": {"mean": 32}, "height": {"mean": 32}, "brightness": {"mean": 0.5, "std": 0.1},
        "classes": [{"label": shape, "predicted_share": 0.25, "true_share": 0.25} for shape in SHAPES],
        "confidence_bins": [{"low": 0.0, "high": 1.0, "share": 1.0, "accuracy": 0.9}], "embedding": reference})
    mean, std = np.array(reference["mean"]), np.array(reference["std"])
    varying = std > 0
    distance = {sha: float(np.sqrt(np.mean(((vector - mean)[varying] / std[varying]) ** 2)))
                for sha, vector in vectors.items()}
    farthest = sorted(distance, key=lambda sha: (-distance[sha], sha))
    with transaction(settings.predictions_db) as connection:  # a labelled image is not chosen
        connection.execute("INSERT INTO ground_truth VALUES (?, 'circle', 'reviewed', 'v1', now())", [farthest[0]])

    chosen = choose(settings.predictions_db, "shapes/2", "outliers", limit=5)
    assert [row["image_sha256"] for row in chosen] == farthest[1:6]
    assert [row["distance"] for row in chosen] == pytest.approx([distance[sha] for sha in farthest[1:6]], rel=1e-5)
    from_inbox = choose(settings.predictions_db, "shapes/2", "outliers", limit=100, classify_runs="run-2-inbox")
    assert [row["image_sha256"] for row in from_inbox] == [sha for sha in farthest[1:] if sha in inbox]

    out = tmp_path / "odd"
    result = CliRunner().invoke(cli, ["review", "export", str(out), "--outliers", "--model", "shapes/2",
                                      "--limit", "3"])
    assert result.exit_code == 0, result.output
    listed = read_labels(out)
    assert [row["sha256"] for row in listed] == farthest[1:4]
    assert [float(row["distance"]) for row in listed] == pytest.approx([distance[sha] for sha in farthest[1:4]],
                                                                      abs=1e-4)
    # A whole classify run, least typical first: every unlabelled image, by distance where its version
    # has reference embeddings, else least confident first; no confidence threshold.
    whole = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "run2"), "--run", "run-2-inbox"])
    assert whole.exit_code == 0, whole.output
    assert [row["sha256"] for row in read_labels(tmp_path / "run2")] == [sha for sha in farthest[1:] if sha in inbox]
    unsure = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "run1"), "--run", "run-1-inbox"])
    assert unsure.exit_code == 0, unsure.output
    confidences = [float(row["confidence"]) for row in read_labels(tmp_path / "run1")]
    assert len(confidences) == 40 and confidences == sorted(confidences)
    # --alerting: the runs whose drift alert is on; none until a threshold every run passes is set.
    quiet = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "none"), "--alerting", "--model", "shapes/1"])
    assert quiet.exit_code == 0 and "no classify run has its drift alert on" in quiet.output
    set_drift_thresholds(settings.predictions_db, ["psi=0"])
    alerting = {run for (run,) in rows_of("SELECT classify_run_id FROM drift_by_run WHERE alert")}
    assert alerting and alerting <= {"run-2-inbox", "run-2-archive.tar.gz"}
    drifted = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "drifted"), "--alerting", "--limit", "500"])
    assert drifted.exit_code == 0, drifted.output
    exported = [row["sha256"] for row in read_labels(tmp_path / "drifted")]
    in_alerting = {sha for (sha,) in rows_of("SELECT image_sha256 FROM predictions WHERE list_contains(?, "
                                              "classify_run_id)", [sorted(alerting)])}
    assert set(exported) == in_alerting - {farthest[0]}
    # Version 1 has embeddings but no reference to measure them from: said in one line, not an empty export.
    older = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "older"), "--outliers", "--model", "shapes/1"])
    assert older.exit_code == 1 and older.output.count("\n") == 1, older.output
    assert "shapes/1 has no reference embeddings" in older.output


def test_label_issues_export_the_doubted_images_of_a_dataset_in_rank_order_with_the_suggested_label(tmp_path):
    from click.testing import CliRunner

    from cnnpipe.cli import cli

    settings = get_settings()
    write_shapes(tmp_path / "source", 8, seed=303)
    store = DatasetStore("pets", settings)
    with store.lock():
        store.commit(store.stage(open_source(str(tmp_path / "source")), IngestOptions(workers=0)))
    stored = store.read_table(["sha256", "label", "split", "member_path"]).to_pylist()
    doubted, corrected = stored[:3], stored[3]
    issues = [(row["sha256"], row["split"], row["label"], "cross" if row["label"] != "cross" else "circle", quality,
               rank) for row, quality, rank in zip(doubted, (0.2, 0.1, 0.3), (2, 1, 3))]
    issues += [(corrected["sha256"], corrected["split"], "square" if corrected["label"] != "square" else "circle",
                corrected["label"], 0.05, 4),  # its label has been corrected since the audit
               ("f" * 64, "train", "circle", "cross", 0.4, 5)]  # gone from the dataset since
    with transaction(settings.predictions_db) as connection:
        connection.executemany("INSERT INTO label_issues VALUES ('pets', 'v1', ?, ?, ?, ?, ?, ?)", issues)

    out = tmp_path / "relabel"
    result = CliRunner().invoke(cli, ["review", "export", str(out), "--label-issues", "pets"])
    assert result.exit_code == 0, result.output
    assert "Wrote 3 image(s)" in result.output and "--dataset pets --relabel" in result.output
    listed = read_labels(out)
    in_rank_order = [issues[1], issues[0], issues[2]]
    assert [(row["sha256"], row["label"], row["given_label"], row["split"], float(row["label_quality"]))
            for row in listed] == [(sha, suggested, given, split, quality)
                                   for sha, split, given, suggested, quality, _ in in_rank_order]
    by_sha = {row["sha256"]: row for row in stored}
    assert [row["member_path"] for row in listed] == [by_sha[row["sha256"]]["member_path"] for row in listed]
    assert all(hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"] for row in listed)
    with open(out / "unavailable.csv", newline="") as handle:
        assert [(row["sha256"], row["reason"]) for row in csv.DictReader(handle)] == \
            [("f" * 64, "no longer in the dataset store")]

    for refused in (["--outliers"], ["--model", "shapes/1", "--run", "r"]):
        wrong = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "x"), "--label-issues", "pets", *refused])
        assert wrong.exit_code == 2 and wrong.output.strip().endswith(
            "--label-issues exports a dataset's images, not predictions: drop " + " and ".join(refused[::2])), \
            wrong.output
    unknown = CliRunner().invoke(cli, ["review", "export", str(tmp_path / "y"), "--label-issues", "nosuch"])
    assert unknown.exit_code == 1 and unknown.output.strip() == "Error: no dataset named 'nosuch'"
