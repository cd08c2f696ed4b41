"""bench/ingest.py's check bound reads and fully decodes every image of a folder, so no ingest can beat it."""

from __future__ import annotations

import pytest

from bench.ingest import check_bound
from tests.imagefactory import jpeg, write_class_folders


def test_the_check_bound_decodes_every_file_and_fails_on_a_truncated_one(tmp_path):
    write_class_folders(tmp_path / "folder", {"a": 3, "b": 2})
    assert check_bound(str(tmp_path / "folder"), "") == 5
    (tmp_path / "folder" / "b" / "cut.jpg").write_bytes(jpeg(7)[:200])
    with pytest.raises(ValueError):
        check_bound(str(tmp_path / "folder"), "")
