from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import duckdb
import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import transaction
from cnnpipe.predictions.records import add_predictions
from cnnpipe.settings import get_settings
from cnnpipe.sources import FolderSource, open_source
from cnnpipe.store import DatasetStore, IngestOptions, resolve_options
from tasks.ingest import commit_version, merge_shards, record_labels, recover_dataset, stage_images, stage_shard
from tasks.retry import is_transient_io_error
from tests.imagefactory import write_class_folders


def test_stage_then_commit_through_the_task_functions(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 3, "dog": 2})
    recover_dataset.fn("taskpets")
    staged = stage_images.fn(str(tmp_path / "src"), "taskpets", IngestOptions(workers=0))
    assert staged.rows == 5 and not DatasetStore("taskpets").exists()
    summary = commit_version.fn(staged)
    assert (summary.added, summary.version, summary.total_rows) == (5, 1, 5)


def failed_with(exc: BaseException):
    return SimpleNamespace(result=lambda raise_on_failure=False: exc)


def test_only_transient_io_errors_are_retried():
    assert is_transient_io_error(None, None, failed_with(ConnectionError("reset")))
    assert is_transient_io_error(None, None, failed_with(OSError(5, "I/O error")))
    assert not is_transient_io_error(None, None, failed_with(CnnpipeError("disk full while writing x")))
    assert not is_transient_io_error(None, None, failed_with(FileNotFoundError("gone")))
    assert not is_transient_io_error(None, None, failed_with(ValueError("bug")))


def test_shards_staged_and_merged_through_the_task_functions(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 9, "dog": 7})
    recover_dataset.fn("taskpets")
    options = IngestOptions(workers=None)  # a shard decodes in one worker process of its own
    shards = [stage_shard.fn(str(tmp_path / "src"), "taskpets", options, index, 3) for index in range(3)]
    assert sum(shard.rows for shard in shards) == 16 and not DatasetStore("taskpets").exists()
    summary = commit_version.fn(merge_shards.fn("taskpets", shards))
    assert (summary.added, summary.version, summary.total_rows) == (16, 1, 16)


def test_shards_take_the_carve_out_decided_once_by_their_parent(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 12, "dog": 12}, split="train")
    write_class_folders(tmp_path / "src", {"cat": 3}, seed=1, split="test")
    recover_dataset.fn("taskpets")
    options = resolve_options(open_source(str(tmp_path / "src")), IngestOptions(workers=0, val_fraction=0.3))
    assert options.carve_val_from_train is True

    monkeypatch.setattr(FolderSource, "explicit_splits", lambda self: pytest.fail("a shard decided again"))
    shards = [stage_shard.fn(str(tmp_path / "src"), "taskpets", options, index, 3) for index in range(3)]
    sharded = commit_version.fn(merge_shards.fn("taskpets", shards))
    monkeypatch.undo()
    local_options = IngestOptions(workers=0, val_fraction=0.3)
    local = commit_version.fn(stage_images.fn(str(tmp_path / "src"), "tasklocal", local_options))
    assert sharded.val_from_train == local.val_from_train == 0.3
    assert sharded.counts == local.counts and sum(local.counts["val"].values()) > 0
    assert sum(local.counts["test"].values()) == 3


def _predict(rows: list[tuple[str, str, str]]) -> None:
    """Predictions as a classify run writes them: (image hash, model version, predicted label)."""
    with transaction(get_settings().predictions_db) as connection:
        connection.execute("CREATE TEMP TABLE made (sha VARCHAR, version VARCHAR, label VARCHAR)")
        connection.executemany("INSERT INTO made VALUES (?, ?, ?)", rows)
        add_predictions(connection, "SELECT sha AS image_sha256, 'inbox' AS source_uri, sha AS member_path, "
                                    "'pets' AS model_name, version AS model_version, label, 0.9 AS confidence, "
                                    "[{'label': label, 'probability': 0.9}] AS top5, NULL::VARCHAR AS mlflow_run_id, "
                                    "NULL::INTEGER AS width, NULL::INTEGER AS height, 'run' AS classify_run_id, "
                                    "? AS predicted_at FROM made",
                        [datetime(2026, 12, 1, 12, tzinfo=timezone.utc)])


def _accuracy() -> list[tuple]:
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        return connection.execute("SELECT model_version, labelled, top1 FROM production_accuracy "
                                  "ORDER BY model_version").fetchall()


def test_labels_that_arrive_after_the_predictions_score_them(tmp_path):
    import hashlib

    images = write_class_folders(tmp_path / "first", {"cat": 3, "dog": 2})
    late = write_class_folders(tmp_path / "late", {"dog": 2}, seed=1)
    sha = [hashlib.sha256(data).hexdigest() for data in images + late]
    # Version 1 got the three cats right and called the dogs cats; version 2 calls everything a dog.
    _predict([(h, "1", "cat") for h in sha] + [(h, "2", "dog") for h in sha])
    assert _accuracy() == []

    commit_version.fn(stage_images.fn(str(tmp_path / "first"), "pets", IngestOptions(workers=0)))
    assert record_labels.fn("pets") == 5
    assert record_labels.fn("pets") == 0  # the same version: nothing to write again
    assert _accuracy() == [("1", 5, pytest.approx(3 / 5)), ("2", 5, pytest.approx(2 / 5))]

    commit_version.fn(stage_images.fn(str(tmp_path / "late"), "pets", IngestOptions(workers=0)))
    assert record_labels.fn("pets") == 7
    assert _accuracy() == [("1", 7, pytest.approx(3 / 7)), ("2", 7, pytest.approx(4 / 7))]
