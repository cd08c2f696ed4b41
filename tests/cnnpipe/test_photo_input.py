"""Photos as they come: with no flags, `cnnpipe train` picks an input size from the images and
squashes non-square ones whole; the size travels with the registered model to `classify`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import duckdb
import mlflow
import pytest

from bench.photos import write_photo_dataset
from cnnpipe.settings import Settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions


@pytest.mark.slow
def test_photos_train_at_a_size_chosen_from_them_and_classify_at_it_untold(prefect_harness, cnnpipe_home, tmp_path):
    # 4:3 frames whose shorter side, 72 px, fills 64 px but not 96: the recipe must choose
    # between 48 and 64 by timing this CPU, and squash rather than crop.
    write_photo_dataset(tmp_path / "photos", classes=3, per_class=14, test_per_class=3, size=(96, 72))
    store = DatasetStore("photos", Settings(home=cnnpipe_home, mlflow_tracking_uri=""))
    with store.lock():
        store.commit(store.stage(open_source(str(tmp_path / "photos")), IngestOptions(workers=0)))
    env = {**{key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"},
           "CNNPIPE_HOME": str(cnnpipe_home), "PREFECT_API_URL": prefect_harness}

    def cnnpipe(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "cnnpipe.cli", *args], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    trained = cnnpipe("train", "--dataset", "photos", "--device", "cpu", "--epochs", "1")
    chosen = re.search(r"recipe: input (\d+) px, whole image squashed \(median image 96x72; \d+ s an epoch "
                       r"estimated", trained.stdout + trained.stderr)
    assert chosen and int(chosen[1]) in (48, 64), trained.stderr[-3000:]
    size = int(chosen[1])

    client = mlflow.MlflowClient(f"sqlite:///{cnnpipe_home / 'mlflow.db'}")
    (version,) = client.search_model_versions()
    params = client.get_run(version.run_id).data.params
    assert (params["config.image_size"], params["config.resize"]) == (str(size), "squash")

    cnnpipe("classify", str(tmp_path / "photos" / "test"), "--device", "cpu", "--model",
            f"{version.name}/{version.version}")
    with duckdb.connect(str(cnnpipe_home / "predictions.duckdb"), read_only=True) as db:
        assert db.execute("SELECT count(*), min(width), min(height) FROM predictions").fetchone() == (9, 96, 72)
