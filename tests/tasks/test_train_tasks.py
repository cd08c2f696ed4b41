from __future__ import annotations

import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.store import DatasetStore, IngestOptions
from tasks.ingest import commit_version, recover_dataset, stage_images
from tasks.train import local_dataset
from tests.imagefactory import write_class_folders


def test_training_reads_the_store_itself_when_local_and_a_copy_when_remote(tmp_path, monkeypatch):
    with pytest.raises(CnnpipeError, match="no dataset named 'ghost'"):
        local_dataset.fn("ghost")
    write_class_folders(tmp_path / "src", {"cat": 3}, split="train")

    def ingest() -> None:
        recover_dataset.fn("pets")
        commit_version.fn(stage_images.fn(str(tmp_path / "src"), "pets", IngestOptions(workers=0)))

    ingest()
    assert local_dataset.fn("pets") == str(DatasetStore("pets").root)

    monkeypatch.setenv("CNNPIPE_DATASETS_URL", f"memory://train-tasks-{tmp_path.name}/datasets")
    ingest()
    copy = local_dataset.fn("pets")
    assert copy == str(DatasetStore("pets").settings.dataset_cache_dir / "pets")
    assert (DatasetStore("pets").settings.dataset_cache_dir / "pets" / "v000001" / "part-00000.parquet").exists()
