"""`cnnpipe audit` through its flow and command, on a real store, DuckDB file and MLflow store:
a planted leak is found and reported, fold trainings give every image out-of-sample
probabilities, and the tables are written for `cnnpipe sql`."""

from __future__ import annotations

import hashlib
import io
import shutil

import duckdb
import mlflow
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from cnn.decoding import decode_images
from cnn.predict import Predictor
from cnnpipe.cli import cli
from cnnpipe.models.params import TrainingParams
from cnnpipe.models.tracking import AUDIT_TAG
from cnnpipe.monitoring.audit import SURE_BITS, leak_check
from cnnpipe.settings import get_settings
from cnnpipe.store import DatasetStore
from cnnpipe.store.twins import stored_images
from flows.audit import audit_dataset
from tests.conftest import _ingest

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


@pytest.fixture
def leaky_shapes(tiny_shapes_dataset, cnnpipe_home, tmp_path) -> tuple[str, str]:
    """The tiny shapes with one train image copied into test, smaller, brighter and re-encoded."""
    shutil.copytree(tiny_shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    store = DatasetStore("shapes")
    table = store.read_table(["sha256", "label", "split"])
    original = next(sha for sha, split in zip(table["sha256"].to_pylist(), table["split"].to_pylist())
                    if split == "train")
    label = table["label"].to_pylist()[table["sha256"].to_pylist().index(original)]
    with Image.open(io.BytesIO(stored_images(store, {original})[original])) as image:
        image = image.convert("RGB")
        image = ImageEnhance.Brightness(image.resize((round(image.width * 0.9),) * 2)).enhance(1.15)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75)
    (tmp_path / "more" / "test" / label).mkdir(parents=True)
    (tmp_path / "more" / "test" / label / "copy.jpg").write_bytes(buffer.getvalue())
    _ingest(cnnpipe_home, "shapes", [tmp_path / "more"])
    return hashlib.sha256(buffer.getvalue()).hexdigest(), original


def test_the_audit_finds_the_planted_leak_and_doubts_labels_from_out_of_sample_folds(leaky_shapes):
    copy, original = leaky_shapes
    findings = audit_dataset("shapes", folds=2, params=TrainingParams(epochs=1, batch_size=16, device="cpu"))
    assert findings.folds == 2 and len(findings.fold_top1) == 2
    leak = next(t for t in findings.twins.twins if t.image_sha256 == copy)
    assert (leak.split, leak.twin_sha256, leak.twin_split, leak.leak) == ("test", original, "train", True)
    assert leak.hash_distance <= 8 and leak.embedding_distance is not None

    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        pairs = connection.execute("SELECT image_sha256, twin_sha256, split, twin_split FROM near_duplicates "
                                   "WHERE dataset = 'shapes'").fetchall()
        issues = connection.execute("SELECT count(*), count(DISTINCT rank), min(rank) FROM label_issues "
                                    "WHERE dataset = 'shapes'").fetchone()
        outliers = connection.execute("SELECT count(*) FROM outliers WHERE dataset = 'shapes'").fetchone()[0]
    assert (copy, original, "test", "train") in pairs and len(pairs) == len(findings.twins.twins)
    assert issues[0] == issues[1] == len(findings.label_issues) and issues[2] in (None, 1)
    assert outliers == len(findings.outliers) == 1  # 1% of 81 images, at least one

    report = get_settings().reports_dir / "audit" / "shapes"
    assert copy[:16] in (report / "audit.md").read_text()
    with Image.open(report / "leak_pairs.png") as thumbnails:
        assert thumbnails.format == "PNG"
    run = mlflow.MlflowClient(get_settings().mlflow_tracking_uri).search_runs(
        [mlflow.get_experiment_by_name("cnn-pipeline").experiment_id], f"tags.`{AUDIT_TAG}` = 'shapes'")[0]
    assert run.data.metrics["test_images_with_twin_in_train"] == len(findings.twins.leaked("test")) >= 1
    assert run.data.metrics["label_issues"] == len(findings.label_issues)


def test_the_command_checks_twins_in_seconds_without_folds(leaky_shapes):
    copy, original = leaky_shapes
    result = CliRunner().invoke(cli, ["audit", "shapes", "--folds", "0"])
    assert result.exit_code == 0, result.output
    assert "test: " in result.stdout and "have a twin in train" in result.stdout
    assert "label issues and outliers not computed" in result.stdout
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        pairs = connection.execute("SELECT hash_distance, embedding_distance FROM near_duplicates "
                                   "WHERE image_sha256 = ? AND twin_sha256 = ?", [copy, original]).fetchall()
    # Without folds there is no model: hashes alone, and only near-identical ones, name a twin.
    assert pairs and all(bits <= SURE_BITS and distance is None for bits, distance in pairs)
    bad = CliRunner().invoke(cli, ["audit", "nosuch", "--folds", "0"])
    assert bad.exit_code != 0 and "no dataset named 'nosuch'" in bad.output


def test_the_leak_check_of_a_training_run_leaves_the_leaked_images_out_of_its_second_figure(leaky_shapes,
                                                                                           shapes_checkpoints):
    copy, original = leaky_shapes
    store = DatasetStore("shapes")
    check = leak_check(store, str(shapes_checkpoints[-1]), "test", 17, 10 / 17)
    assert copy in check.twins.leaked("test") and check.leaked == len(check.twins.leaked("test"))
    predictor = Predictor(shapes_checkpoints[-1])
    leaked = sorted(check.twins.leaked("test"))
    images = stored_images(store, set(leaked))
    predicted = predictor.probabilities(decode_images([images[sha] for sha in leaked], predictor.decode_size))
    right = sum(predictor.classes[int(row.argmax())] == check.twins.labels[sha] for sha, row in zip(leaked, predicted))
    assert check.top1_without_leaks == pytest.approx((10 - right) / (17 - check.leaked))
    assert f"{check.leaked} of the 17 test images have a twin in train" in check.line()
