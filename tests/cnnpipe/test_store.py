from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import duckdb
import psutil
import pyarrow.parquet as pq
import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.reports.markdown import ingest_markdown
from cnnpipe.sources import open_source
from cnnpipe.store import decoders as decoders_module
from cnnpipe.store import parts as parts_module
from cnnpipe.store import staging as staging_module
from cnnpipe.store import (DatasetStore, IngestOptions, list_datasets, open_dataset_source, split_for,
                           split_for_train)
from tests.imagefactory import jpeg, png, write_class_folders


def ingest(source: Path | str, name: str = "pets", workers: int = 0, **options):
    store = DatasetStore(name)
    with store.lock():
        store.recover()
        return store.commit(store.stage(open_source(str(source)), IngestOptions(workers=workers, **options)))


def committed_rows(name: str = "pets") -> list[dict]:
    home = Path(os.environ["CNNPIPE_HOME"])
    glob = str(home / "datasets" / name / "**" / "*.parquet")
    return duckdb.sql(f"SELECT sha256, label, split FROM '{glob}' ORDER BY sha256").fetchall()


def test_ingest_writes_parquet_that_duckdb_and_pyarrow_read(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 6, "dog": 4})
    summary = ingest(tmp_path / "src")
    assert (summary.added, summary.duplicates, summary.rejected, summary.version) == (10, 0, [], 1)
    manifest = DatasetStore("pets").manifest()
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["num_rows"] == 10 == len(committed_rows())
    assert sum(manifest["counts"].get("train", {}).values()) + sum(
        sum(c.values()) for s, c in manifest["counts"].items() if s != "train") == 10
    table = pq.read_table(DatasetStore("pets").files()[0])
    assert set(table.column_names) >= {"sha256", "image", "format", "width", "height", "label", "split",
                                       "source_uri", "ingested_at"}
    assert table.column("width").to_pylist() == [32] * 10


INGEST_IMPORTS_PROBE = """
import sys
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
store = DatasetStore("pets")
with store.lock():
    summary = store.commit(store.stage(open_source(sys.argv[1]), IngestOptions(workers=0)))
print(summary.added, *[name for name in ("pandas", "torch", "duckdb") if name in sys.modules])
"""


def test_an_ingest_imports_neither_pandas_nor_torch_nor_duckdb(tmp_path):
    # pandas is pyarrow's question of every Python list it converts, a third of a second to import.
    write_class_folders(tmp_path / "src", {"cat": 3, "dog": 2})
    done = subprocess.run([sys.executable, "-c", INGEST_IMPORTS_PROBE, str(tmp_path / "src")], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["5"]


DECODER_IMPORTS_PROBE = """
import sys
from tests.imagefactory import jpeg
import cnnpipe.base.processes, cnnpipe.sources.images  # what the pool's pickled calls name
print(len(cnnpipe.sources.images.check_batch([jpeg(1), b"junk"], None)),
      *[name for name in ("fsspec", "pyarrow", "cnnpipe.store", "torch") if name in sys.modules])
"""


def test_a_decoding_process_imports_only_what_decoding_needs():
    # Every ingest starts one a core: what each imports is paid that many times (fsspec alone 0.12 s).
    done = subprocess.run([sys.executable, "-c", DECODER_IMPORTS_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["2"]


def test_a_row_group_built_from_python_values_equals_pyarrows_own_table(monkeypatch):
    from datetime import datetime, timedelta, timezone

    import pyarrow as pa

    from cnnpipe.base import arrow_rows
    from cnnpipe.store.format import SCHEMA

    moment = datetime(2026, 12, 5, 18, 30, 1, 123456, tzinfo=timezone.utc)
    images = [b"", b"\xff\xd8\xff" * 5, bytes(range(256)), b"x" * 7]
    group = {"sha256": [f"{i:064x}" for i in range(4)], "image": images, "format": ["JPEG", "PNG", "JPEG", "PNG"],
             "width": [1, 2**31 - 1, 32, 5], "height": [3, 4, 32, 6], "n_frames": [1, 1, 7, 1],
             "label": ["cät", None, "", "dog"], "split": ["train", "val", None, "test"],
             "source_uri": ["file:///d/ünï/"] * 4, "member_path": ["a/é.jpg", "b/c.png", "x", "ü/1"],
             "ingested_at": [moment, moment, moment - timedelta(days=400), moment],
             "phash": [None, -2**63, 2**63 - 1, 0]}
    expected = pa.Table.from_pydict(group, schema=SCHEMA)
    built = parts_module._as_table(group)
    built.validate(full=True)
    assert built.equals(expected)
    # More image bytes than 32-bit offsets address come in chunks, the rows unchanged.
    monkeypatch.setattr(arrow_rows, "_CHUNK_BYTES", 200)
    chunked = parts_module._as_table(group)
    assert [len(chunk) for chunk in chunked.column("image").chunks] == [2, 1, 1] and chunked.equals(expected)


def test_rerun_adds_nothing_and_new_files_append_a_version(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 5})
    first = ingest(tmp_path / "src")
    again = ingest(tmp_path / "src")
    assert (again.added, again.duplicates, again.version, again.version_id) == (0, 5, 1, first.version_id)
    (tmp_path / "src" / "cat" / "new.png").write_bytes(png(99))
    third = ingest(tmp_path / "src")
    assert (third.added, third.duplicates, third.version) == (1, 5, 2)
    assert third.version_id != first.version_id
    assert len(committed_rows()) == 6
    assert [v["rows"] for v in DatasetStore("pets").manifest()["versions"]] == [5, 1]


def test_a_version_id_names_the_dataset_its_labels_and_splits_and_old_ids_stay_as_written(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "cats", {"cat": 4}, split="val")
    write_class_folders(tmp_path / "dogs", {"dog": 4}, split="val")  # the same images under another label
    write_class_folders(tmp_path / "tested", {"cat": 4}, split="test")  # ... or in another split

    def version_id(machine: str, source: str, name: str = "pets") -> str:
        monkeypatch.setenv("CNNPIPE_HOME", str(tmp_path / machine))
        return ingest(tmp_path / source, name).version_id

    cats = version_id("a", "cats")
    assert version_id("b", "cats") == cats  # the same ingest on another machine
    assert version_id("a", "cats") == cats  # a rerun that adds nothing
    assert len({cats, version_id("c", "dogs"), version_id("d", "tested"), version_id("a", "cats", "pets-copy")}) == 4

    # A dataset committed before the name and labels entered the id keeps the id it was given.
    monkeypatch.setenv("CNNPIPE_HOME", str(tmp_path / "a"))
    store = DatasetStore("pets")
    content_only = sum(int(sha, 16) for sha in store.read_table(["sha256"]).column("sha256").to_pylist()) % 2**256
    old_id = hashlib.sha256(content_only.to_bytes(32, "big")).hexdigest()[:16]
    written = store.location.path / "v000001" / "version.json"
    written.write_text(json.dumps({**json.loads(written.read_text()), "version_id": old_id}))
    (store.location.path / "manifest.json").unlink()
    assert store.manifest()["version_id"] == old_id and store.as_of(old_id) == store.location.path
    write_class_folders(tmp_path / "more", {"cat": 2}, seed=1, split="val")
    added = ingest(tmp_path / "more").version_id
    assert [v["version_id"] for v in store.manifest()["versions"]] == [old_id, added]
    assert json.loads((store.as_of(old_id) / "manifest.json").read_text())["num_rows"] == 4


def test_identical_image_under_two_labels_or_splits_is_reported_not_kept(tmp_path):
    image = jpeg(7)
    for path in ("cat/a.jpg", "cat/copy.jpg", "dog/a.jpg"):
        (tmp_path / "src" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / path).write_bytes(image)
    summary = ingest(tmp_path / "src")
    assert summary.added == 1 and summary.duplicates == 1
    assert [(r.path, r.reason) for r in summary.rejected] == [("dog/a.jpg", "conflict")]
    for split in ("train", "test"):
        (tmp_path / "split" / split / "cat").mkdir(parents=True)
        (tmp_path / "split" / split / "cat" / "a.jpg").write_bytes(image)
    summary = ingest(tmp_path / "split")
    assert summary.added == 0 and len(summary.rejected) >= 1
    assert {r.reason for r in summary.rejected} == {"conflict"}
    assert len(committed_rows()) == 1
    assert any(r["reason"] == "conflict" for r in DatasetStore("pets").rejected())


def test_splits_come_from_folders_or_from_the_content_hash(tmp_path):
    write_class_folders(tmp_path / "split", {"cat": 3}, split="val")
    ingest(tmp_path / "split")
    write_class_folders(tmp_path / "plain", {"dog": 200}, seed=3)
    ingest(tmp_path / "plain", val_fraction=0.25, test_fraction=0.25)
    rows = committed_rows()
    assert {split for _, label, split in rows if label == "cat"} == {"val"}
    dogs = [(sha, split) for sha, label, split in rows if label == "dog"]
    assert all(split == split_for(sha, 0.25, 0.25) for sha, split in dogs)
    assert 25 <= sum(1 for _, split in dogs if split == "test") <= 75


def test_split_for_is_stable_and_respects_fractions():
    shas = [hashlib.sha256(i.to_bytes(4, "big")).hexdigest() for i in range(4000)]
    splits = [split_for(sha, 0.1, 0.2) for sha in shas]
    assert splits == [split_for(sha, 0.1, 0.2) for sha in shas]
    assert abs(splits.count("test") / len(splits) - 0.2) < 0.03
    assert abs(splits.count("val") / len(splits) - 0.1) < 0.03


def test_bad_files_are_rejected_and_the_rest_is_kept(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 3})
    good = jpeg(11, size=(64, 64))
    (tmp_path / "src" / "cat" / "half.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "src" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "src" / "cat" / "notes.jpg").write_text("hello")
    (tmp_path / "src" / "loose.jpg").write_bytes(jpeg(12))
    summary = ingest(tmp_path / "src")
    assert summary.added == 3
    assert summary.rejected_by_reason == {"truncated": 1, "empty": 1, "unidentified": 1, "no_label": 1}
    recorded = {(r["path"], r["reason"]) for r in DatasetStore("pets").rejected()}
    assert ("cat/half.jpg", "truncated") in recorded and len(recorded) == 4


def latin1_named_source(tmp_path: Path, kind: str) -> Path:
    """Three good images in red/ and one whose name is Latin-1 bytes, as an old system writes them."""
    write_class_folders(tmp_path / "src", {"red": 3})
    if kind == "folder":
        (tmp_path / "src" / "red" / os.fsdecode("café0.png".encode("latin-1"))).write_bytes(png(99))
        return tmp_path / "src"
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        tar.add(tmp_path / "src", arcname=".")
        info = tarfile.TarInfo("red/café0.png")
        info.size = len(png(99))
        tar.addfile(info, io.BytesIO(png(99)))
    return archive


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_a_name_that_is_not_utf8_rejects_that_file_alone(tmp_path, kind):
    summary = ingest(latin1_named_source(tmp_path, kind))
    assert (summary.added, summary.version) == (3, 1)
    assert [(r.path, r.reason) for r in summary.rejected] == [("red/caf\\xe90.png", "bad_name")]
    assert [(r["path"], r["reason"]) for r in DatasetStore("pets").rejected()] == [("red/caf\\xe90.png", "bad_name")]
    assert len(committed_rows()) == 3
    staging = Path(os.environ["CNNPIPE_HOME"]) / "staging"
    assert [p for p in staging.rglob("*") if p.is_file()] == []


def test_manifest_checksum_mismatch_is_rejected(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "b.jpg").write_bytes(jpeg(2))
    right = hashlib.sha256(jpeg(1)).hexdigest()
    (tmp_path / "list.csv").write_text(f"path,label,sha256\na.jpg,cat,{right}\nb.jpg,cat,{'0' * 64}\n")
    summary = ingest(tmp_path / "list.csv")
    assert summary.added == 1
    assert [(r.path, r.reason) for r in summary.rejected] == [("b.jpg", "checksum_mismatch")]


def test_a_manifest_row_without_a_label_says_so(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "b.jpg").write_bytes(jpeg(2))
    (tmp_path / "list.csv").write_text("path,label\na.jpg,cat\nb.jpg, \n")
    summary = ingest(tmp_path / "list.csv")
    assert summary.added == 1
    [reject] = summary.rejected
    assert (reject.path, reject.reason) == ("b.jpg", "no_label")
    assert "label column" in reject.detail and "<class>" not in reject.detail


def test_resize_stores_the_papers_crops(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "big.jpg").write_bytes(jpeg(1, size=(640, 480)))
    ingest(tmp_path / "src", resize=256)
    table = DatasetStore("pets").read_table(["format", "width", "height"])
    assert table.to_pylist() == [{"format": "JPEG", "width": 256, "height": 256}]


def test_decoding_in_worker_processes_matches_decoding_inline(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 300, "dog": 300})
    (tmp_path / "src" / "dog" / "bad.jpg").write_bytes(b"nope")
    pooled = ingest(tmp_path / "src", "pooled", workers=2)
    inline = ingest(tmp_path / "src", name="inline")
    assert pooled.added == inline.added == 600
    assert [r.path for r in pooled.rejected] == [r.path for r in inline.rejected] == ["dog/bad.jpg"]
    assert committed_rows("pooled") == committed_rows("inline")


def test_an_image_that_kills_its_decoder_is_rejected_and_the_rest_kept(tmp_path, monkeypatch):
    images = write_class_folders(tmp_path / "src", {"cat": 600})
    # Three chunks: the culprit's in the middle, with one on either side in flight when its decoder dies.
    monkeypatch.setattr(staging_module, "VALIDATION_CHUNK", 256)
    monkeypatch.setenv("FAILPOINT", "decode.image")
    monkeypatch.setenv("FAILPOINT_KEY", hashlib.sha256(images[300]).hexdigest())
    summary = ingest(tmp_path / "src", "crashy", workers=2)
    assert summary.added == 599
    assert [(r.path, r.reason) for r in summary.rejected] == [("cat/0300.jpg", "decoder_crashed")]


def test_a_call_after_a_decoder_died_fails_in_its_future_rather_than_at_submit(monkeypatch):
    """Ingest submits the next chunk before it collects the one whose decoder died; the pool may know
    by then, and that chunk must wait for the culprit's search rather than end the ingest."""
    monkeypatch.setenv("FAILPOINT", "decode.image")  # seen by a worker forked from a server started without it
    pool = decoders_module._DecoderPool(1)
    try:
        with pytest.raises(BrokenProcessPool):
            pool.submit([jpeg(1)], None).result(timeout=60)
        later = pool.submit([jpeg(2)], None)
        with pytest.raises(BrokenProcessPool):
            later.result(timeout=60)
    finally:
        pool.kill()


_OWNER_OF_HUNG_DECODERS = """
import time
from multiprocessing import forkserver
from cnnpipe.store.decoders import _DecoderPool
from tests.imagefactory import jpeg
pool = _DecoderPool(2)
for seed in range(4):
    pool.submit([jpeg(seed)], None)
workers = [pool._pids.get() for _ in range(2)]
print(*workers, forkserver._forkserver._forkserver_pid, flush=True)
time.sleep(3600)
"""


def test_decoders_and_their_fork_server_end_with_an_owner_killed_by_sigkill():
    environment = {**os.environ, "FAILPOINT": "decode.image", "FAILPOINT_ACTION": "hang"}
    owner = subprocess.Popen([sys.executable, "-c", _OWNER_OF_HUNG_DECODERS], stdout=subprocess.PIPE, text=True,
                             env=environment, cwd=Path(__file__).parents[2])
    pids = [int(pid) for pid in owner.stdout.readline().split()]
    assert len(pids) == 3 and all(psutil.pid_exists(pid) for pid in pids)
    owner.kill()
    owner.wait(30)

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 20
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)]


def test_decoders_are_spawned_where_the_fork_server_cannot_start(tmp_path):
    deep = tmp_path / ("d" * 100)  # a socket path under it is too long for AF_UNIX
    deep.mkdir()
    script = ("from cnnpipe.store.decoders import _DecoderPool\n"
              "from tests.imagefactory import jpeg\n"
              "pool = _DecoderPool(1)\n"
              "print(pool.submit([jpeg(1), b'nope'], None).result(timeout=60).refused[1])\n"
              "pool.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(deep)}, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unidentified" in done.stdout


DECOY_RUN = """
import sys
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
if __name__ == "__main__":
    store = DatasetStore("decoyed")
    with store.lock():
        summary = store.commit(store.stage(open_source(sys.argv[1]), IngestOptions(workers=1)))
    print(summary.added, [r.reason for r in summary.rejected])
"""


def test_decoders_import_the_owners_cnnpipe_not_one_in_the_current_folder(tmp_path):
    # Another cnnpipe in the folder a command runs from (a checkout of another version, say): a fork server
    # started with `-c` looks there first, and its decoders took that one's check for the owner's.
    write_class_folders(tmp_path / "src", {"cat": 3})
    decoy = tmp_path / "cwd" / "cnnpipe"
    for package in (decoy, decoy / "base", decoy / "sources"):
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
    (decoy / "base" / "processes.py").write_text("def start_worker(pids, environment):\n    pids.put(0)\n")
    (decoy / "sources" / "images.py").write_text("def check_batch(datas, resize):\n    raise SystemExit('the decoy')\n")
    script = tmp_path / "run" / "ingest.py"
    script.parent.mkdir()
    script.write_text(DECOY_RUN)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "src")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path / "cwd",
                          env={**os.environ, "CNNPIPE_HOME": str(tmp_path / "home"),
                               "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "3 []"


def test_an_image_whose_decoder_hangs_is_rejected_after_a_timeout(tmp_path, monkeypatch):
    images = write_class_folders(tmp_path / "src", {"cat": 300})
    monkeypatch.setattr(staging_module, "VALIDATION_CHUNK", 128)  # the hang in the first of three chunks
    monkeypatch.setattr(decoders_module, "CHUNK_TIMEOUT", 3.0)
    monkeypatch.setattr(decoders_module, "ITEM_TIMEOUT", 2.0)
    monkeypatch.setenv("FAILPOINT", "decode.image")
    monkeypatch.setenv("FAILPOINT_ACTION", "hang")
    monkeypatch.setenv("FAILPOINT_KEY", hashlib.sha256(images[10]).hexdigest())
    others = {process.pid for process in multiprocessing.active_children()}
    summary = ingest(tmp_path / "src", "hung", workers=2)
    assert summary.added == 299
    assert [(r.path, r.reason) for r in summary.rejected] == [("cat/0010.jpg", "decode_timeout")]

    def decoders() -> list:
        return [process for process in multiprocessing.active_children() if process.pid not in others]

    # The hung decoders were killed, not left sleeping (they would block this process's exit).
    deadline = time.monotonic() + 10
    while decoders() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not decoders()


def test_exception_mid_write_publishes_nothing_and_a_rerun_completes(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 20})
    ingest(tmp_path / "src")
    write_class_folders(tmp_path / "src", {"dog": 25}, seed=5)
    monkeypatch.setattr(parts_module, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(parts_module, "PART_ROW_GROUPS", 2)
    monkeypatch.setenv("FAILPOINT", "parquet.after_rowgroup")
    monkeypatch.setenv("FAILPOINT_AFTER", "5")
    monkeypatch.setenv("FAILPOINT_ACTION", "raise")
    with pytest.raises(RuntimeError, match="failpoint"):
        ingest(tmp_path / "src")
    assert len(committed_rows()) == 20
    assert DatasetStore("pets").manifest()["version"] == 1
    # Two complete parts (16 images) were staged before the failure; the rerun adopts them.
    staged = sorted(p.name for p in DatasetStore("pets").staging.glob("part-*"))
    assert staged[:2] == ["part-00000.parquet", "part-00001.parquet"]
    monkeypatch.delenv("FAILPOINT")
    summary = ingest(tmp_path / "src")
    assert (summary.added, summary.version) == (25, 2)
    rows = committed_rows()
    assert len(rows) == 45 == len({sha for sha, _, _ in rows})
    assert not DatasetStore("pets").staging.exists()


def test_disk_full_is_a_clear_error_and_keeps_the_published_version(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 5})
    ingest(tmp_path / "src")
    write_class_folders(tmp_path / "src", {"dog": 5}, seed=9)
    monkeypatch.setenv("FAILPOINT", "parquet.after_rowgroup")
    monkeypatch.setenv("FAILPOINT_ACTION", "enospc")
    with pytest.raises(CnnpipeError, match="disk full while writing .*part-00000.parquet.tmp"):
        ingest(tmp_path / "src")
    assert len(committed_rows()) == 5
    monkeypatch.delenv("FAILPOINT")
    assert ingest(tmp_path / "src").added == 5
    assert len(committed_rows()) == 10


class _DiskFullAfter:
    """A file object that fails with ENOSPC once `limit` bytes were written."""

    def __init__(self, handle, limit: int):
        self.handle, self.limit, self.written = handle, limit, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_a_writer_hitting_enospc_never_publishes_a_readable_empty_part(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 5})
    real_writer = parts_module.pq.ParquetWriter

    def failing_writer(path, *args, **kwargs):
        sink = _DiskFullAfter(open(path, "wb"), limit=64)
        return real_writer(parts_module.pa.PythonFile(sink, mode="w"), *args, **kwargs)

    monkeypatch.setattr(parts_module.pq, "ParquetWriter", failing_writer)
    with pytest.raises(CnnpipeError, match="disk full while writing"):
        ingest(tmp_path / "src")
    home = Path(os.environ["CNNPIPE_HOME"])
    assert not list((home / "datasets").rglob("*.parquet")) if (home / "datasets").exists() else True
    assert not list(DatasetStore("pets").staging.glob("*.parquet"))


def test_a_manifest_left_behind_by_a_crash_is_rebuilt(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 3})
    ingest(tmp_path / "src")
    store = DatasetStore("pets")
    old_manifest = (store.root / "manifest.json").read_text()
    write_class_folders(tmp_path / "src", {"dog": 2}, seed=2)
    ingest(tmp_path / "src")
    (store.root / "manifest.json").write_text(old_manifest)  # as if killed between the rename and the manifest
    assert store.manifest()["version"] == 2 and store.manifest()["num_rows"] == 5
    store.recover()
    assert json.loads((store.root / "manifest.json").read_text())["version"] == 2
    assert ingest(tmp_path / "src").added == 0


def test_a_corrupted_manifest_is_kept_aside_and_rebuilt_and_the_other_datasets_stay_listed(tmp_path, caplog):
    write_class_folders(tmp_path / "src", {"cat": 3})
    ingest(tmp_path / "src", name="a")
    ingest(tmp_path / "src", name="b")
    manifest = DatasetStore("a").root / "manifest.json"
    healthy = json.loads(manifest.read_text())
    manifest.write_text(manifest.read_text()[:40])  # truncated
    assert [(m["name"], m["num_rows"]) for m in list_datasets()] == [("a", 3), ("b", 3)]
    assert json.loads(manifest.read_text()) == healthy
    [aside] = manifest.parent.glob("manifest.json.corrupt-*")
    assert len(aside.read_text()) == 40
    assert f"{manifest}: not valid JSON" in caplog.text and aside.name in caplog.text
    manifest.write_text("{")
    assert ingest(tmp_path / "src", name="a").added == 0
    assert json.loads(manifest.read_text()) == healthy


def test_training_reads_a_rebuilt_manifest_not_a_corrupted_one(tmp_path):
    from cnn.splits import StoreSplit

    write_class_folders(tmp_path / "src", {"cat": 3}, split="train")
    ingest(tmp_path / "src")
    store = DatasetStore("pets")
    (store.root / "manifest.json").write_text("{")
    assert StoreSplit.open(store.local_copy(), "train").rows == 3


def test_training_reads_every_committed_version_when_a_crash_left_the_manifest_behind(tmp_path):
    from cnn.splits import StoreSplit

    write_class_folders(tmp_path / "src", {"cat": 3}, split="train")
    ingest(tmp_path / "src")
    store = DatasetStore("pets")
    old_manifest = (store.root / "manifest.json").read_text()
    write_class_folders(tmp_path / "src", {"dog": 2}, split="train", seed=2)
    ingest(tmp_path / "src")
    (store.root / "manifest.json").write_text(old_manifest)  # killed between the rename and the manifest
    assert StoreSplit.open(store.local_copy(), "train").rows == 5


def test_a_dataset_that_cannot_be_rebuilt_is_named_and_the_others_listed(tmp_path, caplog):
    write_class_folders(tmp_path / "src", {"cat": 3})
    ingest(tmp_path / "src", name="a")
    ingest(tmp_path / "src", name="b")
    damaged = DatasetStore("b").root / "v000001" / "version.json"
    damaged.write_text("{")
    (damaged.parent.parent / "manifest.json").unlink()
    assert [m["name"] for m in list_datasets()] == ["a"]
    assert f"{damaged}: not valid JSON" in caplog.text
    with pytest.raises(CnnpipeError, match=f"{damaged}: not valid JSON"):
        DatasetStore("b").manifest()


def three_versions(tmp_path: Path) -> DatasetStore:
    for seed, label in enumerate(("cat", "dog", "owl")):
        write_class_folders(tmp_path / label, {label: 4}, seed=seed)
        ingest(tmp_path / label)
    return DatasetStore("pets")


def test_a_truncated_part_is_found_named_with_its_repair_and_the_repair_works(tmp_path):
    store = three_versions(tmp_path)
    assert store.verify(read_rows=True) == []
    [part] = (store.root / "v000002").glob("*.parquet")
    part.write_bytes(part.read_bytes()[:300])
    [damaged] = store.verify()
    assert damaged.path == part and "footer" in damaged.problem
    repair = store.repair(damaged.version)
    assert str(store.root / "v000002") in repair and f"cnnpipe ingest file://{tmp_path / 'dog'}" in repair
    with pytest.raises(CnnpipeError, match=f"{part}: .*cnnpipe ingest"):
        store.read_table()
    with pytest.raises(CnnpipeError, match=f"{part}: .*cnnpipe ingest"):
        ingest(tmp_path / "owl")
    with pytest.raises(CnnpipeError, match=f"{part}: .*cnnpipe ingest"):
        list(open_dataset_source("dataset:pets").entries())
    shutil.move(store.root / "v000002", tmp_path / "set-aside")
    assert store.verify(read_rows=True) == []
    assert ingest(tmp_path / "dog").added == 4
    assert store.manifest()["num_rows"] == 12 and store.verify(read_rows=True) == []


def test_verify_reads_every_row_and_names_those_whose_bytes_no_longer_match(tmp_path):
    store = three_versions(tmp_path)
    [part] = (store.root / "v000003").glob("*.parquet")
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    images[1] = images[1][:-1] + bytes([images[1][-1] ^ 1])
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", [images]), part)
    assert store.verify() == []  # the footer is sound
    [damaged] = store.verify(read_rows=True)
    assert damaged.path == part and damaged.version == 3
    assert "1 of 4 rows" in damaged.problem and "owl/0001.jpg" in damaged.problem


def test_stale_staging_from_another_base_version_is_discarded(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 3})
    ingest(tmp_path / "src")
    store = DatasetStore("pets")
    store.staging.mkdir(parents=True)
    (store.staging / "base.json").write_text('{"base_version": 0}')
    shutil.copy(store.files()[0], store.staging / "part-00000.parquet")
    (store.staging / "part-00001.parquet.tmp").write_bytes(b"half")
    store.recover()
    assert not store.staging.exists()


def test_invalid_options_and_names_are_clear_errors():
    with pytest.raises(CnnpipeError, match="sum below 1"):
        IngestOptions(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(CnnpipeError, match="dataset name"):
        DatasetStore("../escape")


def _ingest_after_barrier(barrier, home: str, source: str) -> None:
    os.environ["CNNPIPE_HOME"] = home
    barrier.wait()
    ingest(source)


def test_concurrent_ingests_of_one_dataset_leave_one_version_and_no_duplicates(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 40, "dog": 40})
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    children = [context.Process(target=_ingest_after_barrier, args=(barrier, os.environ["CNNPIPE_HOME"], str(tmp_path / "src")))
                for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    manifest = DatasetStore("pets").manifest()
    assert (manifest["version"], manifest["num_rows"]) == (1, 80)
    rows = committed_rows()
    assert len(rows) == len({sha for sha, _, _ in rows}) == 80


def test_list_datasets_reports_every_dataset(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 2})
    ingest(tmp_path / "src", name="a")
    ingest(tmp_path / "src", name="b")
    assert [(m["name"], m["num_rows"]) for m in list_datasets()] == [("a", 2), ("b", 2)]


def test_two_archive_symlink_attack_writes_nothing_through_the_link(tmp_path):
    import io
    import tarfile

    target = tmp_path / "target"
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    with tarfile.open(first, "w") as tar:
        link = tarfile.TarInfo("x")
        link.type, link.linkname = tarfile.SYMTYPE, "../../target"
        tar.addfile(link)
    with tarfile.open(second, "w") as tar:
        data = jpeg(21)
        member = tarfile.TarInfo("x/payload.jpg")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    assert [r.reason for r in ingest(first).rejected] == ["link"]
    summary = ingest(second)
    assert summary.added == 1 and not target.exists()
    assert committed_rows()[0][1] == "x"


# ---- a validation split carved out of train/ when a source has none -------------------------

CARVE = {"val_fraction": 0.25, "test_fraction": 0.1}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_layout(train: int = 40, test: int = 6, val: int = 0) -> dict[str, bytes]:
    """`train/`, then `test/`, then `val/` members, in that order, with distinct images."""
    files = {f"train/{'cat' if i % 2 else 'dog'}/{i:03d}.jpg": jpeg(20_000 + i) for i in range(train)}
    files |= {f"test/cat/{i:03d}.jpg": jpeg(30_000 + i) for i in range(test)}
    return files | {f"val/dog/{i:03d}.jpg": jpeg(40_000 + i) for i in range(val)}


def write_source(files: dict[str, bytes], path: Path, kind: str = "folder") -> Path:
    if kind == "folder":
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "manifest":
        write_source(files, path.parent / "images")
        path.write_text("path,label,split\n" + "".join(
            f"images/{name},{name.split('/')[1]},{name.split('/')[0]}\n" for name in files))
        return path
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return path
    with tarfile.open(path, {"tar": "w", "tar.gz": "w:gz"}[kind]) as tar:
        for name, data in files.items():  # in insertion order: train/ members come first
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def stored_splits(name: str = "pets") -> dict[str, str]:
    return {sha: split for sha, _, split in committed_rows(name)}


def test_a_source_without_val_carves_it_out_of_train_by_hash_and_keeps_test(tmp_path, caplog):
    files = split_layout()
    source = write_source(files, tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="cnnpipe.store"):
        summary = ingest(source, **CARVE)
    splits = stored_splits()
    train = [sha(data) for name, data in files.items() if name.startswith("train/")]
    assert all(splits[sha(data)] == "test" for name, data in files.items() if name.startswith("test/"))
    assert [splits[image] for image in train] == [split_for_train(image, **CARVE) for image in train]
    carved = [image for image in train if splits[image] == "val"]
    assert 4 <= len(carved) <= 16  # about a quarter of 40
    # The band an unsplit image would get val from: an image is val both ways.
    assert all(split_for(image, **CARVE) == "val" for image in carved)
    assert all(split_for(image, **CARVE) != "val" for image in train if image not in carved)
    assert summary.val_from_train == 0.25 and sum(summary.counts["val"].values()) == len(carved)
    said = [record.getMessage() for record in caplog.records if "no val/ folder" in record.getMessage()]
    assert said == [f"no val/ folder in {open_source(str(source)).uri}: 25% of train/ images (by hash) "
                    "become the validation split (--val-fraction)"]
    assert "25% of its `train/` images" in ingest_markdown(summary)

    again = ingest(source, **CARVE)
    assert (again.added, again.duplicates, again.rejected, again.version) == (0, 46, [], 1)


@pytest.mark.parametrize("kind, name", [("folder", "src"), ("tar", "src.tar"), ("tar.gz", "src.tar.gz"),
                                        ("zip", "src.zip"), ("manifest", "labels.csv")])
def test_a_source_with_val_anywhere_keeps_train_whole(tmp_path, kind, name):
    train = [sha(data) for path, data in split_layout().items() if path.startswith("train/")]
    assert any(split_for_train(image, **CARVE) == "val" for image in train)  # carving would move some

    without = ingest(write_source(split_layout(), tmp_path / "without" / name, kind), "without", **CARVE)
    assert without.val_from_train == 0.25 and "val" in without.counts

    # val/ comes after train/ in the archive and the manifest, and holds 2 of 48 images.
    summary = ingest(write_source(split_layout(val=2), tmp_path / "with" / name, kind), **CARVE)
    splits = stored_splits()
    assert summary.val_from_train == 0 and "no val/ folder" not in ingest_markdown(summary)
    assert [splits[image] for image in train] == ["train"] * 40
    assert {split: sum(labels.values()) for split, labels in summary.counts.items()} == \
        {"train": 40, "test": 6, "val": 2}


def test_val_fraction_zero_keeps_train_whole(tmp_path):
    files = split_layout()
    summary = ingest(write_source(files, tmp_path / "src"), val_fraction=0, test_fraction=0.25)
    assert summary.val_from_train == 0
    assert {split: sum(labels.values()) for split, labels in summary.counts.items()} == {"train": 40, "test": 6}


def test_train_images_stored_before_carving_stay_in_train_without_conflicts(tmp_path):
    source = write_source(split_layout(), tmp_path / "src")
    first = ingest(source, carve_val_from_train=False, **CARVE)  # as ingested before this rule existed
    assert {split: sum(labels.values()) for split, labels in first.counts.items()} == {"train": 40, "test": 6}
    again = ingest(source, **CARVE)
    assert (again.added, again.duplicates, again.rejected, again.version) == (0, 46, [], 1)
    # New train/ images are carved; the stored ones keep their split.
    (source / "train" / "cat" / "new.jpg").write_bytes(jpeg(50_000))
    third = ingest(source, **CARVE)
    assert (third.added, third.rejected, third.version) == (1, [], 2)
    assert stored_splits()[sha(jpeg(50_000))] == split_for_train(sha(jpeg(50_000)), **CARVE)
    assert sum(first.counts["train"].values()) == 40 == sum(
        1 for path, data in split_layout().items() if path.startswith("train/") and stored_splits()[sha(data)] == "train")


@pytest.mark.parametrize("val", [0, 1])
def test_sharded_staging_takes_the_whole_sources_decision(tmp_path, val):
    archive = write_source(split_layout(val=val), tmp_path / "src.tar.gz", "tar.gz")
    count = 3
    shard_paths = [[entry.path for entry in open_source(str(archive)).sharded(index, count).entries()]
                   for index in range(count)]
    assert sum(1 for paths in shard_paths if not any(path.startswith("val/") for path in paths)) >= 2 * val
    local = ingest(archive, "local", **CARVE)
    store = DatasetStore("pets")
    with store.lock():
        store.recover()
        options = IngestOptions(workers=0, **CARVE)
        shards = [store.stage_shard(open_source(str(archive)), options, index, count) for index in range(count)]
        sharded = store.commit(store.merge_shards(shards, count))
    assert committed_rows("pets") == committed_rows("local")
    assert (sharded.added, sharded.counts, sharded.val_from_train) == (local.added, local.counts,
                                                                        0.0 if val else 0.25)
    assert sum(sharded.counts["val"].values()) > 1 if not val else sharded.counts["val"] == {"dog": 1}


def test_verify_passes_images_that_ingest_converted_and_still_names_a_damaged_one(tmp_path):
    from PIL import Image

    source = tmp_path / "src" / "cat"
    source.mkdir(parents=True)
    for index in range(3):
        Image.new("RGBA", (12, 10), (40 * index, 90, 200, 128)).save(source / f"{index}.png")
    (source / "plain.jpg").write_bytes(jpeg(1))
    assert ingest(tmp_path / "src", "converted").added == 4
    store = DatasetStore("converted")
    assert store.verify(read_rows=True) == []
    [part] = store.files()
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    converted = next(index for index, data in enumerate(images) if data[:4] == b"\x89PNG")
    images[converted] = images[converted][:-20] + bytes(20)
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", [images]), part)
    [damaged] = store.verify(read_rows=True)
    assert "1 of 4 rows" in damaged.problem
    write_class_folders(tmp_path / "photos", {"a": 6, "b": 6})
    assert ingest(tmp_path / "photos", "resized", resize=24).added == 12
    assert DatasetStore("resized").verify(read_rows=True) == []
