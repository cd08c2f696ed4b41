"""Inputs that once failed a whole `cnnpipe ingest` or `classify` run with a traceback: each is now
refused in one line, or rejected member by member while the rest goes through."""

from __future__ import annotations

import codecs
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnpipe.cli import cli
from cnnpipe.store import DatasetStore
from tests.imagefactory import png, write_class_folders

pytestmark = pytest.mark.usefixtures("prefect_harness")

LYING_NAME = b"cat/bad\xff\xfe.png"
LYING_NAME_SHOWN = "cat/bad\\xff\\xfe.png"


def zip_with_a_lying_utf8_flag(path: Path) -> Path:
    """Two good images and one whose name is flagged UTF-8 (bit 0x800) but is not. `zipfile`
    writes neither, so a placeholder of the same length is patched in both of its headers."""
    placeholder = b"cat/badXX.png"
    with zipfile.ZipFile(path, "w") as archive:
        for index in (1, 2):
            archive.writestr(f"cat/{index}.png", png(index))
        archive.writestr(placeholder.decode(), png(3))
    data = bytearray(path.read_bytes())
    start = data.find(placeholder)
    while start != -1:
        # A local header holds its name at offset 30, a central directory record at 46.
        local = data[start - 30:start - 26] == b"PK\x03\x04"
        header = start - (30 if local else 46)
        flags = header + (6 if local else 8)
        data[flags + 1] |= 0x08  # the high byte of the little-endian flags: 0x800
        data[start:start + len(placeholder)] = LYING_NAME
        start = data.find(placeholder, start + 1)
    path.write_bytes(data)
    return path


def test_a_zip_whose_utf8_flag_lies_rejects_those_members_as_bad_name_and_ingests_the_rest(tmp_path):
    archive = zip_with_a_lying_utf8_flag(tmp_path / "inbox.zip")
    result = CliRunner().invoke(cli, ["ingest", str(archive), "--dataset", "pets", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "2 added" in result.output and f"{LYING_NAME_SHOWN}: bad_name" in result.output
    store = DatasetStore("pets")
    assert store.manifest()["num_rows"] == 2
    assert [(r["path"], r["reason"]) for r in store.rejected()] == [(LYING_NAME_SHOWN, "bad_name")]


@pytest.mark.slow
def test_classify_rejects_a_zip_member_whose_utf8_flag_lies_and_classifies_the_rest(tmp_path, shapes_checkpoints):
    archive = zip_with_a_lying_utf8_flag(tmp_path / "inbox.zip")
    result = CliRunner().invoke(cli, ["classify", str(archive), "--checkpoint", str(shapes_checkpoints[0])])
    assert result.exit_code == 0, result.output
    assert "2 classified" in result.output and f"{LYING_NAME_SHOWN}: bad_name" in result.output


def test_a_manifest_that_is_not_utf8_is_refused_in_one_line_naming_it_and_the_byte_before_staging(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 2})
    manifest = tmp_path / "src" / "labels.csv"
    # A BOM is fine, and counts in the offset: the 0xe9 of a Latin-1 "café" is byte 30 of the file.
    manifest.write_bytes(codecs.BOM_UTF8 + b"path,label\ncat/0000.jpg,caf\xe9\n")
    result = CliRunner().invoke(cli, ["ingest", str(manifest), "--dataset", "pets", "--workers", "0"])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if "labels.csv" in line] == [
        f"Error: file://{manifest}: not UTF-8 text at byte 30 (0xe9): save the manifest as UTF-8"]
    assert "Traceback" not in result.output
    assert not DatasetStore("pets").staging.exists()

    manifest.write_bytes(codecs.BOM_UTF8 + "path,label\ncat/0000.jpg,café\n".encode())
    accepted = CliRunner().invoke(cli, ["ingest", str(manifest), "--dataset", "pets", "--workers", "0"])
    assert accepted.exit_code == 0, accepted.output
    assert DatasetStore("pets").manifest()["classes"] == ["café"]


def test_ingest_on_a_full_disk_removes_its_partial_part_at_once_and_a_rerun_finishes(tmp_path, cnnpipe_home,
                                                                                     monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 3, "dog": 2})
    command = ["ingest", str(tmp_path / "src"), "--dataset", "pets", "--workers", "0"]
    monkeypatch.setenv("FAILPOINT", "parquet.after_rowgroup")
    monkeypatch.setenv("FAILPOINT_ACTION", "enospc")
    full = CliRunner().invoke(cli, command)
    assert full.exit_code == 1
    assert [line for line in full.output.splitlines() if line.startswith("Error:")] == [
        f"Error: disk full while writing {DatasetStore('pets').staging / 'part-00000.parquet.tmp'}: "
        "No space left on device"]
    assert not list(cnnpipe_home.rglob("*.tmp"))

    monkeypatch.delenv("FAILPOINT")
    rerun = CliRunner().invoke(cli, command)
    assert rerun.exit_code == 0, rerun.output
    assert "5 added" in rerun.output
    store = DatasetStore("pets")
    shas = store.read_table(["sha256"]).column("sha256").to_pylist()
    assert len(shas) == 5 == len(set(shas))


def test_a_second_writer_says_in_one_line_that_it_waits_its_turn(tmp_path, prefect_harness):
    """Two ingests into one dataset take turns; the second says so, rather than sit silent."""
    import fcntl
    import os
    import subprocess
    import sys
    import threading

    from cnnpipe.settings import get_settings

    write_class_folders(tmp_path / "photos", {"cat": 2})
    lock_path = get_settings().locks_dir / "dataset-pets.lock"
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        second = subprocess.Popen([sys.executable, "-m", "cnnpipe.cli", "ingest", str(tmp_path / "photos"),
                                   "--dataset", "pets", "--workers", "0"],
                                  env={**os.environ, "PREFECT_API_URL": prefect_harness},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        silent_too_long = threading.Timer(90, second.kill)  # a command that waits without a word
        silent_too_long.start()
        before_release = []
        for line in second.stdout:
            before_release.append(line)
            if "waiting for another writer of dataset pets" in line:
                break
        silent_too_long.cancel()
    rest = second.stdout.read()
    assert second.wait(timeout=120) == 0, "".join(before_release) + rest
    assert "waiting for another writer of dataset pets" in before_release[-1]
    assert "added" not in "".join(before_release) and "2 added" in rest
