"""Ingestion and classification sharded over a real local Ray cluster (`ray start --head`, 2 CPUs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import psutil
import pytest

from cnnpipe.settings import get_settings
from cnnpipe.store import DatasetStore
from flows.classify import classify
from flows.ingest import ingest
from tests.e2e.servers import free_port
from tests.imagefactory import jpeg, write_class_folders

pytest.importorskip("prefect_ray", reason="the ray extra is not installed")
# Alone, after the parallel part (`make test`): `ray stop --force` and the kill test's process search
# reach every Ray process here, and under pytest-xdist the driver lost its cluster's GCS in 2 of 3 runs.
pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.serial]

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # In a session of its own: Ray's raylet SIGKILLs the process group of a worker that dies, and a
    # kill test makes one die; the group must never be pytest's.
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--port", str(port), "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120,
                   start_new_session=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, check=False, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained alexnet-cifar with an embedding projection: what the rows hold matters here, not how
    right they are, and this session runs alone, where training the shared shapes model cost seconds."""
    import torch

    from cnn.embeddings import fit_projection, save_projection
    from cnn.model import build_model

    path = tmp_path_factory.mktemp("untrained") / "model.pt"
    torch.manual_seed(0)
    model = build_model("alexnet-cifar", 2)
    save_projection(fit_projection(torch.randn(64, model.classifier[-1].in_features)), path.parent)
    torch.save({"model": model.state_dict(), "classes": ["a", "b"],
                "config": {"dataset_dir": "untrained", "model": "alexnet-cifar", "norm": "lrn", "padding": "zeros",
                           "pool": "max", "dropout": 0.5},
                "colour_stats": {"mean": [0.5] * 3, "std": [0.25] * 3, "eigenvalues": [0.0] * 3,
                                 "eigenvectors": torch.eye(3).tolist()}}, path)
    return str(path)


def _rows() -> list[tuple]:
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        return connection.execute("SELECT image_sha256, member_path, label, round(confidence, 4) FROM predictions "
                                  "ORDER BY image_sha256").fetchall()


def test_sharded_classification_writes_the_rows_of_a_local_run(ray_address, tmp_path, checkpoint, monkeypatch):
    write_class_folders(tmp_path / "inbox", {"a": 40, "b": 40})
    (tmp_path / "inbox" / "a" / "broken.jpg").write_bytes(b"not an image")
    local = classify(str(tmp_path / "inbox"), checkpoint=checkpoint, device="cpu")
    expected = _rows()

    monkeypatch.setenv("CNNPIPE_HOME", str(tmp_path / "sharded-home"))
    sharded = classify(str(tmp_path / "inbox"), checkpoint=checkpoint, device="cpu", ray_address=ray_address,
                       shards=3)
    assert _rows() == expected and len(expected) == 80
    assert (sharded.classified, [r.path for r in sharded.rejected]) == (80, ["a/broken.jpg"])
    assert sharded.class_counts == local.class_counts
    again = classify(str(tmp_path / "inbox"), checkpoint=checkpoint, device="cpu", ray_address=ray_address)
    assert (again.classified, again.skipped) == (0, 80)
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        assert connection.execute("SELECT count(*) FROM classify_runs").fetchone() == (2,)


def _shard_workers(task: str = "classify-shard") -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if task in " ".join(process.info["cmdline"] or []) and process.pid != os.getpid():
            found.append(process)
    return found


def test_a_killed_ray_worker_loses_and_duplicates_nothing(ray_address, tmp_path, checkpoint):
    write_class_folders(tmp_path / "inbox", {"a": 1000, "b": 1000, "c": 1000})  # seeds stay distinct
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = classify(str(tmp_path / "inbox"), checkpoint=checkpoint, device="cpu",
                                          ray_address=ray_address, shards=2)
        except Exception as exc:  # noqa: BLE001 - a clear failure is allowed; the rerun must finish
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 120
    while not _shard_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _shard_workers()
    assert workers, "no shard ever started"
    time.sleep(2)  # let it stage some parts first
    os.kill(workers[0].pid, signal.SIGKILL)
    runner.join(300)
    assert not runner.is_alive()
    if "error" in outcome:
        classify(str(tmp_path / "inbox"), checkpoint=checkpoint, device="cpu", ray_address=ray_address, shards=2)
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        total, distinct = connection.execute("SELECT count(*), count(DISTINCT image_sha256) FROM predictions").fetchone()
    assert total == distinct == 3000


def _stored(dataset: str = "pets") -> list[tuple]:
    table = DatasetStore(dataset).read_table(["sha256", "label", "split", "image"])
    return sorted(zip(*(table.column(name).to_pylist() for name in table.column_names)))


def test_sharded_ingest_stores_the_rows_of_a_local_run(ray_address, tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"a": 40, "b": 40})
    for copy in range(4):
        (tmp_path / "src" / "a" / f"copy-{copy}.jpg").write_bytes(jpeg(0))
    (tmp_path / "src" / "b" / "broken.jpg").write_bytes(b"not an image")
    local = ingest(source=str(tmp_path / "src"), dataset="pets")
    expected = _stored()

    monkeypatch.setenv("CNNPIPE_HOME", str(tmp_path / "sharded-home"))
    sharded = ingest(source=str(tmp_path / "src"), dataset="pets", ray_address=ray_address, shards=3)
    assert _stored() == expected and len(expected) == 80
    assert (sharded.added, sharded.duplicates, sharded.counts) == (local.added, local.duplicates, local.counts)
    assert [reject.path for reject in sharded.rejected] == ["b/broken.jpg"]
    again = ingest(source=str(tmp_path / "src"), dataset="pets", ray_address=ray_address)
    assert (again.added, again.version) == (0, 1)


def test_a_killed_ray_worker_during_ingest_loses_and_duplicates_nothing(ray_address, tmp_path):
    for seed in (0, 1):
        write_class_folders(tmp_path / "src", {f"{seed}-{label}": 1000 for label in "abc"}, seed=seed)
    shards = DatasetStore("pets").shards_staging
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = ingest(source=str(tmp_path / "src"), dataset="pets", ray_address=ray_address,
                                        shards=2)
        except Exception as exc:  # noqa: BLE001 - a clear failure is allowed; the rerun must finish
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 120
    # Mid-run: a shard has written row groups into a part it has not yet published.
    while not list(shards.glob("*/shard-*/*.parquet.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _shard_workers("stage-shard")
    assert workers, "no shard was caught mid-run"
    os.kill(workers[0].pid, signal.SIGKILL)
    runner.join(300)
    assert not runner.is_alive()
    if "error" in outcome:
        ingest(source=str(tmp_path / "src"), dataset="pets", ray_address=ray_address, shards=2)
    stored = _stored()
    assert len(stored) == len({sha for sha, *_ in stored}) == 6000
    assert DatasetStore("pets").manifest()["version"] == 1
