from __future__ import annotations

from types import SimpleNamespace

from cnnpipe.errors import CnnpipeError
from cnnpipe.store import DatasetStore, IngestOptions
from tasks.ingest import commit_version, merge_shards, recover_dataset, stage_images, stage_shard
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
