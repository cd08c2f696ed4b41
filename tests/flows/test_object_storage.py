"""S3 as a source and as the dataset store, on a local S3-compatible server (moto's server mode).

Credentials and the endpoint come from the standard AWS variables, as on a real bucket.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import duckdb
import pytest

from cnnpipe.demo import SHAPES, write_demo_images
from cnnpipe.models.params import TrainingParams
from cnnpipe.settings import get_settings
from cnnpipe.store import DatasetStore
from flows.classify import classify
from flows.ingest import ingest
from flows.train import train
from tests.e2e.servers import free_port, process

s3fs = pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytestmark = [pytest.mark.xdist_group("object-storage"), pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


PER_CLASS, ARCHIVE_PER_CLASS = 30, 10
IMAGES, ARCHIVED = PER_CLASS * len(SHAPES), ARCHIVE_PER_CLASS * len(SHAPES)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.skip("moto[server] is not installed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    ready = lambda: urllib.request.urlopen(url, timeout=2).status == 200  # noqa: E731
    with process([str(moto), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), log, ready, "moto server"):
        yield url


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    name = f"images-{os.getpid()}-{tmp_path.name[-8:].lower().replace('_', '-')}"
    fs.mkdir(name)
    # A fifth of the demo's shapes: every file is a request to the moto server.
    folder, archive = write_demo_images(tmp_path / "demo", per_class=PER_CLASS, archive_per_class=ARCHIVE_PER_CLASS)
    fs.put(str(folder), f"{name}/shapes", recursive=True)
    fs.put(str(archive), f"{name}/more-shapes.tar")
    s3fs.S3FileSystem.clear_instance_cache()
    return name


def test_ingest_and_classify_from_s3(bucket, shapes_checkpoints):
    summary = ingest(source=f"s3://{bucket}/shapes", dataset="from-s3")
    assert summary.added == IMAGES and {r.reason for r in summary.rejected} == {"truncated", "unidentified"}
    assert summary.source_uri == f"s3://{bucket}/shapes"
    assert DatasetStore("from-s3").manifest()["num_rows"] == IMAGES
    assert ingest(source=f"s3://{bucket}/shapes", dataset="from-s3").added == 0  # incremental

    first = classify(f"s3://{bucket}/more-shapes.tar", checkpoint=str(shapes_checkpoints[-1]), device="cpu")
    again = classify(f"s3://{bucket}/more-shapes.tar", checkpoint=str(shapes_checkpoints[-1]), device="cpu")
    assert (first.classified, again.classified, again.skipped) == (ARCHIVED, 0, ARCHIVED)
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        assert connection.execute("SELECT count(*), any_value(source_uri) FROM predictions").fetchone() == \
            (ARCHIVED, f"s3://{bucket}/more-shapes.tar")


def test_the_dataset_store_on_s3_ingests_trains_and_serves_as_a_source(bucket, monkeypatch, s3_endpoint,
                                                                       shapes_checkpoints):
    monkeypatch.setenv("CNNPIPE_DATASETS_URL", f"s3://{bucket}/datasets")
    summary = ingest(source=f"s3://{bucket}/shapes", dataset="shapes")
    store = DatasetStore("shapes")
    assert (summary.added, store.root) == (IMAGES, f"s3://{bucket}/datasets/shapes")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    assert fs.exists(f"{bucket}/datasets/shapes/v000001/version.json")
    assert not (get_settings().home / "datasets").exists()
    assert ingest(source=f"s3://{bucket}/more-shapes.tar", dataset="shapes").version == 2

    outcome = train(dataset="shapes", params=TrainingParams(epochs=1, batch_size=32, lr=0.01, dropout=0.2,
                                                            device="cpu", registered_model="s3-shapes"))
    assert outcome.fit.dataset_version == store.manifest()["version_id"]
    cached = get_settings().dataset_cache_dir / "shapes"
    assert json.loads((cached / "manifest.json").read_text())["version_id"] == outcome.fit.dataset_version

    test_images = sum(store.manifest()["counts"]["test"].values())
    classified = classify("dataset:shapes/test", checkpoint=str(shapes_checkpoints[-1]), device="cpu")
    assert classified.classified == test_images > 0
