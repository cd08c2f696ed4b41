"""`cnnpipe similar` and the `similar_images` macro over the embeddings classify stores, on a real DuckDB file."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from cnnpipe.cli import cli
from cnnpipe.models import registry
from cnnpipe.models.registry import load_predictor
from cnnpipe.predictions.classify import classify_source, open_classify_source
from cnnpipe.predictions.sql import run_query
from cnnpipe.settings import get_settings
from cnnpipe.demo import SHAPES, encode, render_shape

pytestmark = pytest.mark.slow


def _similar(*arguments: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["similar", *arguments, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # --export says what it wrote on stderr


def test_the_nearest_image_is_a_re_encoded_twin_and_sql_finds_the_same(register_version, tmp_path):
    rng = np.random.default_rng(3)
    inbox = tmp_path / "inbox"
    for shape in SHAPES:
        (inbox / shape).mkdir(parents=True)
        for index in range(10):
            (inbox / shape / f"{index}.png").write_bytes(encode(render_shape(shape, rng), "PNG"))
    original = inbox / "circle" / "0.png"
    # The same picture after JPEG at quality 75 and a slight brightening: another file, another hash.
    twin = ImageEnhance.Brightness(Image.open(original).convert("RGB")).enhance(1.1)
    buffer = io.BytesIO()
    twin.save(buffer, "JPEG", quality=75)
    (inbox / "circle" / "twin.jpg").write_bytes(buffer.getvalue())
    register_version("shapes-model", 0.9)
    settings = get_settings()
    summary = classify_source(open_classify_source(str(inbox)), load_predictor("shapes-model/1"),
                              settings.predictions_db, settings.staging_dir, "run")
    assert summary.classified == 41

    found = _similar(str(original), "--model", "shapes-model/1", "--k", "3")
    assert len(found) == 3 and [row["distance"] for row in found] == sorted(row["distance"] for row in found)
    assert found[0]["member_path"] == "circle/twin.jpg" and found[0]["predicted_label"] in SHAPES
    original_sha = hashlib.sha256(original.read_bytes()).hexdigest()
    assert _similar(original_sha, "--model", "shapes-model", "--k", "3") == found
    # An alias other than champion, which only the registry knows, is resolved there.
    registry.client().set_registered_model_alias("shapes-model", "challenger", "1")
    assert _similar(original_sha, "--model", "shapes-model@challenger", "--k", "3") == found
    macro = run_query(f"SELECT image_sha256 FROM similar_images('{original_sha}', 'shapes-model', '1', 3)",
                      settings.predictions_db)
    assert [row[0] for row in macro.rows] == [row["image_sha256"] for row in found]
    # An image no run classified is embedded by the registered version first.
    unseen = tmp_path / "unseen.png"
    unseen.write_bytes(encode(render_shape("cross", rng), "PNG"))
    nearest_to_unseen = _similar(str(unseen), "--model", "shapes-model/1", "--k", "5")
    assert len(nearest_to_unseen) == 5 and nearest_to_unseen[0]["distance"] <= nearest_to_unseen[-1]["distance"]


def test_similar_refuses_what_it_cannot_search_in_one_line(cnnpipe_home):
    for argument, expected in [("nothing-here", "neither an image file nor a SHA-256"),
                               ("ab" * 32, "has classified no image with this SHA-256")]:
        result = CliRunner().invoke(cli, ["similar", argument, "--model", "m/1"])
        assert result.exit_code == 1 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_version_registered_before_embeddings_gets_its_projection_on_demand(register_version, shapes_checkpoints,
                                                                              shapes_dataset, tmp_path):
    import shutil

    import mlflow
    import torch

    from cnn.embeddings import PROJECTION_FILE
    from cnnpipe.models.projections import ensure_projection

    settings = get_settings()
    older = tmp_path / "older" / shapes_checkpoints[-1].name  # a run from before embeddings: no embedding.pt
    older.parent.mkdir()
    shutil.copy(shapes_checkpoints[-1], older)
    version = register_version("preembedding", 0.5, checkpoint=older)
    predictor = load_predictor("preembedding/1")
    assert predictor.projection is None
    ensure_projection(predictor, settings)  # its dataset is not here: it stays without, and writes none
    assert predictor.projection is None
    shutil.copytree(shapes_dataset, settings.datasets_dir / "shapes")
    ensure_projection(predictor, settings)
    fitted = predictor.projection
    # The same projection fit fits: on the same train split, from the same weights.
    expected = torch.load(shapes_checkpoints[-1].parent / PROJECTION_FILE, weights_only=True)
    assert torch.allclose(fitted.mean, expected["mean"], atol=1e-4)
    assert mlflow.artifacts.download_artifacts(f"runs:/{version.run_id}/embedding/1.pt", dst_path=str(tmp_path))
    again = load_predictor("preembedding/1")
    ensure_projection(again, settings)  # from the cache, the same
    assert torch.equal(again.projection.components, fitted.components)


def test_similar_within_a_dataset_names_labels_and_splits_and_exports_the_images(register_version, shapes_dataset,
                                                                                tmp_path):
    import csv
    import shutil

    settings = get_settings()
    shutil.copytree(shapes_dataset, settings.datasets_dir / "shapes")
    register_version("shapes-model", 0.9)
    result = CliRunner().invoke(cli, ["similar", "ab" * 32, "--model", "shapes-model/1", "--dataset", "ghost"])
    assert result.exit_code == 1 and "no dataset named 'ghost'" in result.output
    summary = classify_source(open_classify_source("dataset:shapes/test"), load_predictor("shapes-model/1"),
                              settings.predictions_db, settings.staging_dir, "run")
    query = run_query("SELECT image_sha256, label FROM predictions ORDER BY member_path LIMIT 1",
                      settings.predictions_db).rows[0][0]
    found = _similar(query, "--model", "shapes-model/1", "--dataset", "shapes", "--k", "4", "--export",
                     str(tmp_path / "look"))
    assert len(found) == 4 and {row["split"] for row in found} == {"test"} and summary.classified == 80
    assert all(row["label"] in SHAPES and row["image_sha256"] != query for row in found)
    with open(tmp_path / "look" / "labels.csv") as handle:
        exported = list(csv.DictReader(handle))
    assert [row["sha256"] for row in exported] == [row["image_sha256"] for row in found]
    assert all((tmp_path / "look" / row["path"]).exists() for row in exported)
