"""Sharded staging and the one committer that merges the shards (what runs on Ray, here in one process)."""

from __future__ import annotations

from collections import Counter

import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.sources import Source, open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tests.imagefactory import jpeg, write_class_folders

OPTIONS = IngestOptions(workers=0)


def ingest_in_shards(source, count: int, name: str = "pets"):
    store = DatasetStore(name)
    with store.lock():
        store.recover()
        shards = [store.stage_shard(open_source(str(source)), OPTIONS, index, count) for index in range(count)]
        return store.commit(store.merge_shards(shards, count))


def ingest_at_once(source, name: str):
    store = DatasetStore(name)
    with store.lock():
        return store.commit(store.stage(open_source(str(source)), OPTIONS))


def stored(name: str = "pets") -> list[tuple]:
    table = DatasetStore(name).read_table(["sha256", "label", "split", "image"])
    return sorted(zip(*(table.column(column).to_pylist() for column in table.column_names)))


def shard_of(source, path: str, count: int) -> int:
    return next(index for index in range(count)
                if path in {entry.path for entry in open_source(str(source)).sharded(index, count).entries()})


def test_shards_committed_together_store_what_one_run_stores(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 30, "dog": 20})
    for copy in range(6):  # the same bytes under six names, which the shards split between them
        (tmp_path / "src" / "cat" / f"copy-{copy}.jpg").write_bytes(jpeg(0))
    (tmp_path / "src" / "dog" / "broken.jpg").write_bytes(b"not an image")
    assert len({shard_of(tmp_path / "src", f"cat/copy-{copy}.jpg", 3) for copy in range(6)}) > 1

    one_run = ingest_at_once(tmp_path / "src", "one-run")
    sharded = ingest_in_shards(tmp_path / "src", 3)
    assert stored() == stored("one-run") and len(stored()) == 50
    assert (sharded.added, sharded.duplicates, sharded.version) == (one_run.added, one_run.duplicates, 1) == (50, 6, 1)
    assert [reject.path for reject in sharded.rejected] == ["dog/broken.jpg"]
    assert sharded.counts == one_run.counts
    assert not DatasetStore("pets").shards_staging.exists()
    again = ingest_in_shards(tmp_path / "src", 3)
    assert (again.added, again.duplicates, again.version) == (0, 56, 1)


def test_one_image_under_two_labels_in_two_shards_keeps_one_and_reports_the_other(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 10})
    for label in ("cat", "dog"):
        (tmp_path / "src" / label).mkdir(exist_ok=True)
    names = {"cat": "same-a.jpg", "dog": "same-b.jpg"}
    for label, name in names.items():
        (tmp_path / "src" / label / name).write_bytes(jpeg(500))
    count = 2
    while shard_of(tmp_path / "src", "cat/same-a.jpg", count) == shard_of(tmp_path / "src", "dog/same-b.jpg", count):
        count += 1
    summary = ingest_in_shards(tmp_path / "src", count)
    conflicts = [reject for reject in summary.rejected if reject.reason == "conflict"]
    assert len(conflicts) == 1 and summary.added == 11
    kept_label = {"cat", "dog"} - {conflicts[0].path.split("/")[0]}
    assert Counter(label for _, label, _, _ in stored()) == ({"cat": 11} if kept_label == {"cat"} else
                                                              {"cat": 10, "dog": 1})


def test_a_finished_shard_is_not_read_again_and_a_stale_one_is_redone(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 8, "dog": 8})
    store = DatasetStore("pets")
    first = [store.stage_shard(open_source(str(tmp_path / "src")), OPTIONS, index, 2) for index in range(2)]

    def unreadable(self):
        raise AssertionError("a finished shard read its source again")

    with monkeypatch.context() as patch:
        patch.setattr(Source, "entries", unreadable)
        again = [store.stage_shard(open_source(str(tmp_path / "src")), OPTIONS, index, 2) for index in range(2)]
    assert again == first and sum(run.rows for run in first) == 16

    ingest_at_once(tmp_path / "src", "pets")  # another writer commits version 1 meanwhile
    with pytest.raises(CnnpipeError, match="gained a version"):
        store.merge_shards(first, 2)
    store.recover()
    assert not list(store.shards_staging.glob("*/shard-*"))
    summary = ingest_in_shards(tmp_path / "src", 2)
    assert (summary.added, summary.duplicates, summary.version) == (0, 16, 1)


def test_a_shard_killed_midway_adopts_its_published_parts(tmp_path, monkeypatch):
    monkeypatch.setattr("cnnpipe.store.parts.PART_ROW_GROUPS", 1)
    monkeypatch.setattr("cnnpipe.store.parts.ROW_GROUP_ROWS", 4)
    write_class_folders(tmp_path / "src", {"cat": 20, "dog": 20})
    store = DatasetStore("pets")
    store.stage_shard(open_source(str(tmp_path / "src")), OPTIONS, 0, 2)
    directory = store.shard_staging(open_source(str(tmp_path / "src")).uri, 2) / "shard-00000"
    parts = sorted(directory.glob("part-*.parquet"))
    assert len(parts) > 2
    for later in parts[2:]:  # as if killed after publishing two parts
        later.unlink()
    (directory / "staged.json").unlink()
    adopted = {part.stat().st_ino for part in parts[:2]}
    summary = ingest_in_shards(tmp_path / "src", 2)
    assert summary.added == 40 and len(stored()) == len({sha for sha, *_ in stored()}) == 40
    committed = {part.stat().st_ino for part in (DatasetStore("pets").root / "v000001").glob("part-*.parquet")}
    assert adopted <= committed  # the very files, not rewritten
