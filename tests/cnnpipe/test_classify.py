from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import pytest

from cnn.predict import Predictor
from cnnpipe.classify import classify_source, open_classify_source
from cnnpipe.errors import CnnpipeError
from cnnpipe.settings import get_settings
from tests.imagefactory import write_class_folders

pytestmark = pytest.mark.slow


def run(source, checkpoint, run_id="run"):
    settings = get_settings()
    return classify_source(open_classify_source(str(source)), Predictor(checkpoint), settings.predictions_db,
                           settings.staging_dir, run_id)


def query(sql: str):
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        return connection.execute(sql).fetchall()


@pytest.fixture
def inbox(tmp_path) -> Path:
    write_class_folders(tmp_path / "inbox", {"a": 30, "b": 20})
    (tmp_path / "inbox" / "a" / "broken.jpg").write_text("not an image")
    return tmp_path / "inbox"


def test_classify_writes_one_row_per_valid_image_and_reruns_add_nothing(inbox, shapes_checkpoints):
    first = run(inbox, shapes_checkpoints[0], "first")
    assert (first.classified, first.skipped, [r.reason for r in first.rejected]) == (50, 0, ["unidentified"])
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM predictions") == [(50, 50)]
    row = query("SELECT label, confidence, len(top5), top5[1].label = label, width, model_version "
                "FROM predictions LIMIT 1")[0]
    assert row[0] in {"circle", "cross", "square", "triangle"} and 0 < row[1] <= 1 and row[2] == 4 and row[3]
    assert (row[4], row[5]) == (32, first.model_version)
    again = run(inbox, shapes_checkpoints[0], "again")
    assert (again.classified, again.skipped) == (0, 50)
    assert query("SELECT count(*) FROM predictions") == [(50,)]
    assert query("SELECT classify_run_id, classified, skipped, rejected FROM classify_runs ORDER BY started_at") == [
        ("first", 50, 0, 1), ("again", 0, 50, 1)]
    assert query("SELECT member_path, reason FROM rejected_inputs WHERE classify_run_id = 'first'") == [
        ("a/broken.jpg", "unidentified")]


def test_a_new_model_version_classifies_everything_again(inbox, shapes_checkpoints):
    first = run(inbox, shapes_checkpoints[0])
    second = run(inbox, shapes_checkpoints[1])
    assert first.model_version != second.model_version and second.classified == 50
    assert query("SELECT model_version, count(*) FROM predictions GROUP BY ALL ORDER BY ALL") == sorted(
        [(first.model_version, 50), (second.model_version, 50)])


def test_archives_classify_like_folders(inbox, shapes_checkpoints, tmp_path):
    archive = tmp_path / "inbox.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(inbox, arcname="inbox")
    summary = run(archive, shapes_checkpoints[0])
    assert summary.classified == 50
    labels_from_tar = dict(query("SELECT image_sha256, label FROM predictions"))
    assert len(labels_from_tar) == 50


def test_a_reader_holding_the_database_delays_but_never_breaks_a_run(inbox, shapes_checkpoints):
    run(inbox, shapes_checkpoints[0])  # creates the database
    database = get_settings().predictions_db
    reader = subprocess.Popen([sys.executable, "-c",
                               "import duckdb, sys, time\n"
                               f"c = duckdb.connect({str(database)!r}, read_only=True)\n"
                               "print(c.execute('SELECT count(*) FROM predictions').fetchone()[0], flush=True)\n"
                               "time.sleep(2)\n"],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "50"  # the reader got its answer and holds the file
    summary = run(inbox, shapes_checkpoints[1])
    assert reader.wait(30) == 0
    assert summary.classified == 50 and query("SELECT count(*) FROM predictions") == [(100,)]


@pytest.mark.crash
def test_sigkill_after_a_commit_then_rerun_gives_exactly_one_row_per_image(inbox, shapes_checkpoints):
    script = (
        "import sys\nimport cnnpipe.classify as c\nfrom cnn.predict import Predictor\n"
        "from cnnpipe.settings import get_settings\nfrom cnnpipe.sources import open_source\n"
        "c.PART_ROWS, c.BATCH = 16, 16\ns = get_settings()\n"
        f"c.classify_source(open_source({str(inbox)!r}), Predictor({str(shapes_checkpoints[0])!r}),"
        " s.predictions_db, s.staging_dir, sys.argv[1])\n"
    )
    env = {**os.environ, "FAILPOINT": "duckdb.after_commit", "FAILPOINT_AFTER": "2", "FAILPOINT_ACTION": "kill"}
    killed = subprocess.run([sys.executable, "-c", script, "killed"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert query("SELECT count(*) FROM predictions") == [(32,)]  # two committed parts of 16
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("FAILPOINT")}
    rerun = subprocess.run([sys.executable, "-c", script, "rerun"], env=clean_env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM predictions") == [(50, 50)]
    assert not list((get_settings().staging_dir / "classify").iterdir())


def test_a_dataset_of_the_store_is_a_source_keyed_by_its_stored_hashes(shapes_dataset, cnnpipe_home,
                                                                       shapes_checkpoints):
    import shutil

    import pyarrow.parquet as pq

    shutil.copytree(shapes_dataset, cnnpipe_home / "datasets" / "shapes")
    stored = pq.read_table(sorted((cnnpipe_home / "datasets" / "shapes").glob("v*/*.parquet")),
                           columns=["sha256", "split"]).to_pylist()
    test_split = {row["sha256"] for row in stored if row["split"] == "test"}
    summary = run("dataset:shapes/test", shapes_checkpoints[-1])
    assert summary.classified == len(test_split) and summary.source_uri == "dataset:shapes/test"
    assert {sha for (sha,) in query("SELECT image_sha256 FROM predictions")} == test_split
    whole = run("dataset:shapes", shapes_checkpoints[-1])
    assert (whole.skipped, whole.classified) == (len(test_split), len(stored) - len(test_split))
    for bad, reason in [("dataset:ghost", "no dataset named 'ghost'"), ("dataset:shapes/holdout", "no split")]:
        with pytest.raises(CnnpipeError, match=reason):
            open_classify_source(bad)
