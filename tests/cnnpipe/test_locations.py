"""The dataset store on an fsspec URL (memory:// here; s3:// against moto in tests/flows)."""

from __future__ import annotations

import uuid
from collections import Counter

import fsspec
import pytest

from cnn.splits import StoreSplit
from cnnpipe.errors import CnnpipeError
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetSource, DatasetStore, IngestOptions, list_datasets
from tests.imagefactory import png, write_class_folders


@pytest.fixture
def remote_store(monkeypatch) -> str:
    url = f"memory://stores-{uuid.uuid4().hex[:8]}/datasets"
    monkeypatch.setenv("CNNPIPE_DATASETS_URL", url)
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def ingest(source, name: str = "pets"):
    store = DatasetStore(name)
    with store.lock():
        store.recover()
        return store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))


def rows(store: DatasetStore) -> list[tuple]:
    table = store.read_table(["sha256", "label", "split", "image"])
    return sorted(zip(*(table.column(name).to_pylist() for name in table.column_names)))


def test_a_store_on_an_fsspec_url_holds_what_a_local_store_holds(tmp_path, monkeypatch, remote_store):
    write_class_folders(tmp_path / "src", {"cat": 6, "dog": 5})
    first = ingest(tmp_path / "src")
    (tmp_path / "src" / "cat" / "new.png").write_bytes(png(7))
    second = ingest(tmp_path / "src")
    remote = DatasetStore("pets")
    assert str(remote.root) == f"{remote_store}/pets"
    assert fsspec.filesystem("memory").exists(f"{remote_store}/pets/v000002/version.json")
    assert (first.added, second.added, second.duplicates, second.version) == (11, 1, 11, 2)
    assert [m["name"] for m in list_datasets()] == ["pets"]

    monkeypatch.delenv("CNNPIPE_DATASETS_URL")
    ingest(tmp_path / "src")
    local = DatasetStore("pets")
    assert local.root == local.settings.datasets_dir / "pets"
    assert rows(remote) == rows(local) and len(rows(local)) == 12
    assert remote.manifest()["counts"] == local.manifest()["counts"]


def test_a_corrupted_manifest_on_an_fsspec_url_is_kept_aside_and_rebuilt(tmp_path, remote_store):
    write_class_folders(tmp_path / "src", {"cat": 3})
    ingest(tmp_path / "src")
    memory = fsspec.filesystem("memory")
    manifest = f"{remote_store}/pets/manifest.json"
    healthy = memory.cat_file(manifest)
    memory.pipe_file(manifest, healthy[:40])
    assert [(m["name"], m["num_rows"]) for m in list_datasets()] == [("pets", 3)]
    assert memory.cat_file(manifest) == healthy
    [aside] = memory.glob(f"{remote_store}/pets/manifest.json.corrupt-*")
    assert memory.cat_file(aside) == healthy[:40]


def trainable_rows(dataset_dir) -> int:
    # train/ folders without val/: some images are carved into val at ingest.
    return sum(StoreSplit.open(dataset_dir, split).rows for split in ("train", "val"))


def test_training_reads_a_local_copy_that_fetches_only_new_parts(tmp_path, remote_store):
    write_class_folders(tmp_path / "src", {"cat": 6, "dog": 5}, split="train")
    ingest(tmp_path / "src")
    store = DatasetStore("pets")
    copy = store.local_copy()
    assert copy.is_relative_to(store.settings.home) and (copy / "manifest.json").exists()
    assert trainable_rows(copy) == 11
    fetched = (copy / "v000001" / "part-00000.parquet").stat().st_mtime_ns

    write_class_folders(tmp_path / "more", {"cat": 3}, seed=1, split="train")
    ingest(tmp_path / "more")
    assert trainable_rows(store.local_copy()) == 14
    assert (copy / "v000001" / "part-00000.parquet").stat().st_mtime_ns == fetched


def test_a_damaged_cached_part_is_fetched_again(tmp_path, remote_store):
    write_class_folders(tmp_path / "src", {"cat": 3}, split="train")
    ingest(tmp_path / "src")
    store = DatasetStore("pets")
    [part] = store.local_copy().glob("v*/*.parquet")
    part.write_bytes(part.read_bytes()[:300])
    assert StoreSplit.open(store.local_copy(), "train").rows == 3
    assert len(StoreSplit((part,), "train", ("cat",), "", 3).row_groups()) == 1


def test_a_dataset_on_object_storage_is_a_source_to_classify(tmp_path, remote_store):
    write_class_folders(tmp_path / "src", {"cat": 4}, split="test")
    ingest(tmp_path / "src")
    entries = list(DatasetSource(DatasetStore("pets"), "test").entries())
    assert sorted(entry.content_sha256 for entry in entries) == [sha for sha, *_ in rows(DatasetStore("pets"))]


def test_an_upload_that_died_before_its_version_json_is_invisible_and_redone(tmp_path, monkeypatch, remote_store):
    write_class_folders(tmp_path / "src", {"cat": 6})
    ingest(tmp_path / "src")
    write_class_folders(tmp_path / "src", {"dog": 4}, seed=1)
    monkeypatch.setenv("FAILPOINT", "store.before_commit")
    monkeypatch.setenv("FAILPOINT_ACTION", "raise")
    with pytest.raises(RuntimeError, match="failpoint"):
        ingest(tmp_path / "src")
    memory = fsspec.filesystem("memory")
    assert memory.exists(f"{remote_store}/pets/v000002/part-00000.parquet")  # uploaded, not committed
    store = DatasetStore("pets")
    assert store.manifest()["version"] == 1 and len(rows(store)) == 6

    monkeypatch.delenv("FAILPOINT")
    summary = ingest(tmp_path / "src")
    assert (summary.added, summary.version) == (4, 2)
    assert len(rows(store)) == len({sha for sha, *_ in rows(store)}) == 10
    assert memory.ls(f"{remote_store}/pets/v000002", detail=False) == sorted(
        f"/{remote_store.removeprefix('memory://')}/pets/v000002/{name}"
        for name in ("part-00000.parquet", "version.json"))


def test_a_writer_on_another_host_that_commits_first_makes_this_one_fail_without_overwriting(
        tmp_path, monkeypatch, remote_store):
    write_class_folders(tmp_path / "src", {"cat": 6})
    ingest(tmp_path / "src")
    write_class_folders(tmp_path / "mine", {"dog": 4}, seed=1)
    here = DatasetStore("pets")
    staged = here.stage(open_source(str(tmp_path / "mine")), IngestOptions(workers=0))

    monkeypatch.setenv("CNNPIPE_HOME", str(tmp_path / "other-host"))  # its own staging and locks
    write_class_folders(tmp_path / "theirs", {"bird": 3}, seed=2)
    assert ingest(tmp_path / "theirs").version == 2

    with pytest.raises(CnnpipeError, match="v000002 was committed by another writer meanwhile"):
        here.commit(staged)
    assert Counter(label for _, label, _, _ in rows(here)) == {"cat": 6, "bird": 3}
