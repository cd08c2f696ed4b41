"""bench/ingest.py's bounds: the check reads every image of a folder and checks it as ingest's decoders
do; the floor with guarantees also hashes every file and fsyncs what it wrote."""

from __future__ import annotations

import pytest

from bench.ingest import check_bound, work_bound
from tests.imagefactory import jpeg, write_class_folders


def test_the_check_bound_checks_every_file_as_ingest_does_and_refuses_a_truncated_one(tmp_path):
    write_class_folders(tmp_path / "folder", {"a": 3, "b": 2})
    checked = check_bound(str(tmp_path / "folder"), "")
    assert checked["images"] == 5 and checked["refused"] == 0 and checked["decode_cpu"] > 0
    (tmp_path / "folder" / "b" / "cut.jpg").write_bytes(jpeg(7)[:200])
    assert check_bound(str(tmp_path / "folder"), "")["refused"] == 1


def test_the_work_bound_spreads_the_guarded_floor_and_the_check_over_every_core(monkeypatch):
    monkeypatch.setattr("cnn.cores.usable_cores", lambda: 2)
    assert work_bound({"cpu": 0.6, "seconds": 0.7}, {"decode_cpu": 1.4, "images": 9}) == pytest.approx(1.0)


def test_the_floor_with_guarantees_stores_each_files_hash_beside_the_floors_rows(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    from bench.ingest import floor, floor_with_guarantees

    images = write_class_folders(tmp_path / "folder", {"a": 3, "b": 2})
    assert floor(str(tmp_path / "folder"), str(tmp_path / "floor.parquet")) == 5
    assert floor_with_guarantees(str(tmp_path / "folder"), str(tmp_path / "guarded.parquet")) == 5
    plain, guarded = pq.read_table(tmp_path / "floor.parquet"), pq.read_table(tmp_path / "guarded.parquet")
    assert guarded.select(["path", "image"]).equals(plain)
    assert sorted(guarded.column("sha256").to_pylist()) == sorted(hashlib.sha256(data).hexdigest() for data in images)
