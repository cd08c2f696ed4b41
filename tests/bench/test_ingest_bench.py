"""bench/ingest.py's check bound reads and fully decodes every image of a folder, so no ingest can beat it."""

from __future__ import annotations

import pytest

from bench.ingest import check_bound, work_bound
from tests.imagefactory import jpeg, write_class_folders


def test_the_check_bound_decodes_every_file_and_fails_on_a_truncated_one(tmp_path):
    write_class_folders(tmp_path / "folder", {"a": 3, "b": 2})
    checked = check_bound(str(tmp_path / "folder"), "")
    assert checked["images"] == 5 and checked["decode_cpu"] > 0
    (tmp_path / "folder" / "b" / "cut.jpg").write_bytes(jpeg(7)[:200])
    with pytest.raises(ValueError):
        check_bound(str(tmp_path / "folder"), "")


def test_the_work_bound_spreads_the_floor_and_the_decoding_over_every_core(monkeypatch):
    monkeypatch.setattr("cnn.cores.usable_cores", lambda: 2)
    assert work_bound({"cpu": 0.6, "seconds": 0.7}, {"decode_cpu": 1.4, "images": 9}) == pytest.approx(1.0)
