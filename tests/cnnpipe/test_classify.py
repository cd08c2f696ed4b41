from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from cnn.decoding import decode_images
from cnn.predict import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.classify import _checked_pixels, _decoded, classify_source, open_classify_source
from cnnpipe.predictions.database import connect_for_writing
from cnnpipe.predictions.sql import run_query
from cnnpipe.settings import get_settings
from cnnpipe.sources.images import RejectedImage
from tests.imagefactory import jpeg, png, write_class_folders

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
    # Every prediction has its embedding, once; an image's nearest neighbour is itself.
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM embeddings JOIN predictions "
                 "USING (image_sha256, model_name, model_version)") == [(50, 50)]
    nearest = query("SELECT a.image_sha256, arg_min(b.image_sha256, array_cosine_distance(a.embedding, b.embedding)) "
                    "FROM embeddings a, embeddings b GROUP BY ALL")
    assert len(nearest) == 50 and all(sha == twin for sha, twin in nearest)
    assert query("SELECT classify_run_id, classified, skipped, rejected FROM classify_runs ORDER BY started_at") == [
        ("first", 50, 0, 1), ("again", 0, 50, 1)]
    assert query("SELECT member_path, reason FROM rejected_inputs WHERE classify_run_id = 'first'") == [
        ("a/broken.jpg", "unidentified")]


def test_a_name_that_is_not_utf8_is_rejected_and_the_rest_classified(tmp_path, shapes_checkpoints):
    write_class_folders(tmp_path / "inbox", {"a": 3})
    (tmp_path / "inbox" / "a" / os.fsdecode(b"bad\xff.png")).write_bytes(png(99))
    summary = run(tmp_path / "inbox", shapes_checkpoints[0])
    assert (summary.classified, [(r.path, r.reason) for r in summary.rejected]) == (3, [("a/bad\\xff.png", "bad_name")])
    assert query("SELECT count(*) FROM predictions") == [(3,)]
    assert query("SELECT member_path, reason FROM rejected_inputs") == [("a/bad\\xff.png", "bad_name")]
    assert list((get_settings().staging_dir / "classify").iterdir()) == []


def test_copies_of_a_broken_file_are_each_refused_by_name_not_skipped_as_classified(inbox, shapes_checkpoints):
    for copy in ("copy1.jpg", "copy2.jpg"):
        (inbox / "b" / copy).write_text("not an image")
    (inbox / "b" / "twin.jpg").write_bytes((inbox / "a" / "0001.jpg").read_bytes())
    summary = run(inbox, shapes_checkpoints[0])
    assert (summary.classified, summary.skipped) == (50, 1)
    assert sorted((r.path, r.reason) for r in summary.rejected) == [
        ("a/broken.jpg", "unidentified"), ("b/copy1.jpg", "unidentified"), ("b/copy2.jpg", "unidentified")]
    assert query("SELECT count(*) FROM rejected_inputs") == [(3,)]


def test_images_reach_the_model_in_batches_of_the_batch_size_asked_for(inbox, shapes_checkpoints):
    predictor = Predictor(shapes_checkpoints[0], batch_size=8)
    sizes = []
    classify = predictor.top_k
    predictor.top_k = lambda images, k: (sizes.append(len(images)), classify(images, k))[1]
    settings = get_settings()
    summary = classify_source(open_classify_source(str(inbox)), predictor, settings.predictions_db,
                              settings.staging_dir, "run")
    assert summary.classified == 50 and sizes == [8] * 6 + [2]


def test_each_row_holds_what_the_model_says_of_that_image_alone(inbox, shapes_checkpoints):
    # Batches of 7 decode in one task a thread: a broken image among them, and a last batch of 1,
    # must not shift any image's pixels onto another's row.
    (inbox / "b" / "0003.jpg").write_bytes(b"\xff\xd8\xff broken")
    predictor = Predictor(shapes_checkpoints[0], batch_size=7)
    settings = get_settings()
    summary = classify_source(open_classify_source(str(inbox)), predictor, settings.predictions_db,
                              settings.staging_dir, "run")
    assert summary.classified == 49
    stored = dict((path, (label, confidence)) for path, label, confidence in
                  query("SELECT member_path, label, confidence FROM predictions"))
    alone = {}
    for image in sorted(inbox.rglob("*.jpg")):
        path = image.relative_to(inbox).as_posix()
        if path in stored:
            values, indices = predictor.top_k(decode_images([image.read_bytes()], predictor.decode_size), 1).arrays()[:2]
            alone[path] = (predictor.classes[indices[0, 0]], pytest.approx(float(values[0, 0]), abs=1e-6))
    assert stored == alone and len(alone) == 49


@pytest.mark.parametrize("count", [0, 1, 2, 3, 9])
def test_a_batch_decodes_in_order_in_one_task_a_thread(count):
    datas = [jpeg(index) for index in range(count)]
    if count > 2:
        datas[1] = b"not an image"
    pending = [(str(index), f"{index}.jpg", data) for index, data in enumerate(datas)]
    with ThreadPoolExecutor(2) as pool:
        decoded = list(_decoded(pool, pending, 32, "crop"))
    alone = [_checked_pixels(data, 32) for data in datas]
    assert len(decoded) == count
    for one, other in zip(decoded, alone):
        if isinstance(other, RejectedImage):
            assert isinstance(one, RejectedImage) and one.reason == other.reason
        else:
            assert one[:2] == other[:2] and np.array_equal(one[2], other[2])


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


_CLASSIFY_IN_PARTS_OF_16 = """
import sys, time
from pathlib import Path
import cnnpipe.predictions.classify as c
from cnn.decoding import decode_images
from cnn.predict import Predictor
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
c.PART_ROWS = 16
s, predictor = get_settings(), Predictor(sys.argv[2], batch_size=16)
if len(sys.argv) > 4:  # wait for a go file, so that two runs start together
    print("ready", flush=True)
    while not Path(sys.argv[4]).exists():
        time.sleep(0.01)
c.classify_source(open_source(sys.argv[1]), predictor, s.predictions_db, s.staging_dir, sys.argv[3])
"""


def test_two_runs_started_together_classify_each_image_once(inbox, shapes_checkpoints, tmp_path):
    """A scheduled run that starts while the previous one still runs: no image twice, no work twice."""
    go = tmp_path / "go"
    runs = [subprocess.Popen([sys.executable, "-c", _CLASSIFY_IN_PARTS_OF_16, str(inbox), str(shapes_checkpoints[0]),
                              f"run-{n}", str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n in range(2)]
    assert [run.stdout.readline().strip() for run in runs] == ["ready", "ready"]
    go.touch()
    for run in runs:
        assert run.wait(300) == 0, run.stderr.read()[-2000:]
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM predictions") == [(50, 50)]
    assert query("SELECT count(*), sum(classified), sum(skipped) FROM classify_runs") == [(2, 50, 50)]


@pytest.mark.crash
def test_sigkill_after_a_commit_then_rerun_gives_exactly_one_row_per_image(inbox, shapes_checkpoints):
    arguments = [sys.executable, "-c", _CLASSIFY_IN_PARTS_OF_16, str(inbox), str(shapes_checkpoints[0])]
    env = {**os.environ, "FAILPOINT": "duckdb.after_commit", "FAILPOINT_AFTER": "2", "FAILPOINT_ACTION": "kill"}
    killed = subprocess.run([*arguments, "killed"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Two committed parts, of 16 and then 32 (parts grow), each with its embeddings in the same transaction.
    assert query("SELECT count(*) FROM predictions") == query("SELECT count(*) FROM embeddings") == [(48,)]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("FAILPOINT")}
    rerun = subprocess.run([*arguments, "rerun"], env=clean_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM predictions") == [(50, 50)]
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM embeddings") == [(50, 50)]
    assert not list((get_settings().staging_dir / "classify").iterdir())


def test_a_dataset_of_the_store_is_a_source_keyed_by_its_stored_hashes(shapes_dataset, cnnpipe_home,
                                                                       shapes_checkpoints):
    import shutil

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


_STAGE_THEN_COMMIT_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
import cnnpipe.predictions.classify as c
from cnn.decoding import decode_images
from cnn.predict import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
source, checkpoint, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = get_settings()
c.classify_source(open_source(source), Predictor(checkpoint), s.predictions_db, s.staging_dir, "full", commit=False)
# From here on, no file may grow past `limit` bytes: DuckDB's log and checkpoints hit it.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    c.commit_parts(s.predictions_db, s.staging_dir / "classify")
except CnnpipeError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.crash
@pytest.mark.parametrize("limit", [0, 65536], ids=["full-when-opening", "full-when-committing"])
def test_a_full_disk_is_one_clear_line_and_the_rerun_commits_the_staged_part(tmp_path, shapes_checkpoints, limit):
    write_class_folders(tmp_path / "many", {"a": 300, "b": 300})
    run(tmp_path / "many", shapes_checkpoints[0])
    database, staging = get_settings().predictions_db, get_settings().staging_dir / "classify"
    full = subprocess.run([sys.executable, "-c", _STAGE_THEN_COMMIT_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path / "many"),
                           str(shapes_checkpoints[1]), str(limit)], capture_output=True, text=True, timeout=300)
    assert full.returncode == 3, full.stderr[-2000:]
    message = full.stdout.strip()
    assert "\n" not in message and message.startswith(f"{database}: ") and "File too large" in message
    assert "full-00000.parquet stays staged" in message
    assert query("SELECT count(*) FROM predictions") == [(600,)]  # what the first run wrote, and nothing more
    assert [part.name for part in staging.iterdir()] == ["full-00000.parquet"]

    rerun = run(tmp_path / "many", shapes_checkpoints[1])
    assert (rerun.classified, rerun.skipped) == (0, 600)  # the staged predictions were committed, not recomputed
    assert query("SELECT count(*), count(DISTINCT (image_sha256, model_version)) FROM predictions") == [(1200, 1200)]
    assert not list(staging.iterdir())


def test_a_writer_gives_up_on_a_held_lock_with_one_clear_line(inbox, shapes_checkpoints):
    run(inbox, shapes_checkpoints[0])
    database = get_settings().predictions_db
    reader = subprocess.Popen([sys.executable, "-c",
                               "import duckdb, time\n"
                               f"c = duckdb.connect({str(database)!r}, read_only=True)\n"
                               "print('holding', flush=True)\n"
                               "time.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "holding"
        with pytest.raises(CnnpipeError, match=f"^{database}: another process still holds it after 3 tries"):
            connect_for_writing(database, retries=3)
    finally:
        reader.kill()
        reader.wait()
    assert query("SELECT count(*) FROM predictions") == [(50,)]


_KILLED_WHILE_ITS_LOG_HOLDS_A_COMMIT = """
import duckdb, os, signal, sys
connection = duckdb.connect(sys.argv[1])
connection.execute("CREATE TABLE t AS SELECT range AS i FROM range(1000)")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.crash
@pytest.mark.parametrize("damage", ["flipped-bytes", "another-databases-log"])
def test_a_write_ahead_log_duckdb_cannot_replay_is_set_aside_and_the_run_completes(inbox, shapes_checkpoints,
                                                                                    tmp_path, caplog, damage):
    env = {**os.environ, "FAILPOINT": "duckdb.after_commit", "FAILPOINT_AFTER": "2", "FAILPOINT_ACTION": "kill"}
    killed = subprocess.run([sys.executable, "-c", _CLASSIFY_IN_PARTS_OF_16, str(inbox), str(shapes_checkpoints[0]),
                             "killed"], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    database = get_settings().predictions_db
    wal = database.with_name(database.name + ".wal")
    assert wal.stat().st_size > 0  # the second part's commit, never checkpointed
    if damage == "flipped-bytes":
        with wal.open("r+b") as log:
            log.seek(wal.stat().st_size // 2)
            log.write(b"\xff" * 8)
    else:
        other = tmp_path / "other.duckdb"
        subprocess.run([sys.executable, "-c", _KILLED_WHILE_ITS_LOG_HOLDS_A_COMMIT, str(other)], timeout=60)
        wal.write_bytes(other.with_name("other.duckdb.wal").read_bytes())
    damaged = wal.read_bytes()

    summary = run(inbox, shapes_checkpoints[0], run_id="rerun")
    assert summary.classified + summary.skipped == 50
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM predictions") == [(50, 50)]
    [aside] = database.parent.glob("predictions.duckdb.wal.corrupt-*")
    assert aside.read_bytes() == damaged  # set aside, never deleted
    [warning] = [r.getMessage() for r in caplog.records if "write-ahead log" in r.getMessage()]
    assert str(database) in warning and aside.name in warning
    assert run_query("SELECT count(*) FROM predictions", database).rows == [(50,)]


CLASSIFY_IMPORTS_PROBE = """
import sys
from pathlib import Path
import tasks.classify  # everything a classify flow run imports before its first image
from cnn.predict import Predictor
from cnnpipe.predictions.classify import classify_source, open_classify_source
from cnnpipe.monitoring.drift_picture import drift_distributions
from cnnpipe.settings import get_settings
inbox, checkpoint = sys.argv[1:]
settings = get_settings()
summary = classify_source(open_classify_source(inbox), Predictor(checkpoint), settings.predictions_db,
                          settings.staging_dir, "probe")
drift_distributions({"classes": [("a", 0.5, 0.4)], "bins": [(0.0, 1.0, 1.0, 1.0)]}, "probe", Path(inbox) / "d.png")
print(summary.classified, *[name for name in ("pandas", "matplotlib", "mlflow") if name in sys.modules])
"""


def test_a_classify_run_imports_neither_pandas_nor_matplotlib_nor_mlflow(inbox, shapes_checkpoints):
    # Each took a small `cnnpipe classify` half a second or more to import (bench/cli.py).
    done = subprocess.run([sys.executable, "-c", CLASSIFY_IMPORTS_PROBE, str(inbox), str(shapes_checkpoints[0])],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["50"]


def test_a_part_that_cannot_commit_is_staged_and_the_rerun_commits_it(inbox, shapes_checkpoints, monkeypatch):
    import cnnpipe.predictions.classify as classify_module

    def full_disk(database, *args, **kwargs):
        raise CnnpipeError(f"{database}: could not commit (No space left on device)")

    with monkeypatch.context() as patched:
        patched.setattr(classify_module, "transaction", full_disk)
        with pytest.raises(CnnpipeError, match=r"No space left on device\); .*run-00000\.parquet stays staged"):
            run(inbox, shapes_checkpoints[0])
    staging = get_settings().staging_dir / "classify"
    [part] = staging.iterdir()
    assert len(pq.read_table(part)) == 50

    rerun = run(inbox, shapes_checkpoints[0], run_id="rerun")
    assert (rerun.classified, rerun.skipped) == (0, 50)  # committed from the part, not classified again
    assert query("SELECT count(*), count(DISTINCT image_sha256) FROM predictions") == [(50, 50)]
    assert not list(staging.iterdir())
