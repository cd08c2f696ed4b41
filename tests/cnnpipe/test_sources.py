from __future__ import annotations

import builtins
import bz2
import errno
import gzip
import io
import lzma
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import fsspec
import pytest

from cnnpipe.errors import CnnpipeError
from cnnpipe.sources import (FolderSource, UnsafePath, label_and_split, open_source, safe_relative_path,
                             with_retries)
from tests.imagefactory import jpeg, write_class_folders


def entries_of(uri: str, **kwargs) -> list:
    return list(open_source(uri, **kwargs).entries())


def good(entries) -> dict[str, tuple]:
    return {e.path: (e.label, e.split, e.data) for e in entries if e.reject_reason is None}


def rejected(entries) -> dict[str, str]:
    return {e.path: e.reject_reason for e in entries if e.reject_reason}


def tar_of(files: dict[str, bytes], path: Path, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_label_and_split_come_from_the_path():
    assert label_and_split("cat/1.jpg") == ("cat", None)
    assert label_and_split("train/cat/1.jpg") == ("cat", "train")
    assert label_and_split("wrapper/validation/dog/1.jpg") == ("dog", "val")
    assert label_and_split("1.jpg") == (None, None)


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/abs/evil", "C:\\win\\x.jpg", "..\\back.jpg", "c:/x.jpg"])
def test_unsafe_paths_are_refused(name):
    with pytest.raises(UnsafePath):
        safe_relative_path(name)


def test_safe_paths_are_normalised():
    assert safe_relative_path("./train//cat/./1.jpg") == "train/cat/1.jpg"
    assert safe_relative_path("cat\\1.jpg") == "cat/1.jpg"


def test_every_source_kind_yields_the_same_entries(tmp_path):
    folder = tmp_path / "images"
    write_class_folders(folder, {"cat": 3, "dog": 2}, split="train")
    write_class_folders(folder, {"cat": 1, "dog": 1}, split="test", seed=1)
    (folder / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}
    expected = {path: (path.split("/")[1], path.split("/")[0], data) for path, data in files.items()}

    tar_of(files, tmp_path / "images.tar")
    tar_of(files, tmp_path / "images.tar.gz", "w:gz")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f"images/{path},{label},{split}\n" for path, (label, split, _) in expected.items()))
    memory = fsspec.filesystem("memory")
    for name, data in files.items():
        memory.pipe(f"/mem-images/{name}", data)

    for uri in (str(folder), f"file://{folder}", str(tmp_path / "images.tar"), str(tmp_path / "images.tar.gz"),
                str(tmp_path / "images.zip"), "memory://mem-images"):
        assert good(entries_of(uri)) == expected, uri
    from_manifest = good(entries_of(str(manifest)))
    assert {path.removeprefix("images/"): value for path, value in from_manifest.items()} == expected

    # Shards are disjoint and together yield exactly the whole source, for every kind.
    for uri in (str(folder), str(tmp_path / "images.tar.gz"), str(tmp_path / "images.zip"), str(manifest)):
        whole = [e.path for e in open_source(uri).entries()]
        shards = [[e.path for e in open_source(uri).sharded(i, 3).entries()] for i in range(3)]
        assert sorted(sum(shards, [])) == sorted(whole) and sum(1 for s in shards if s) >= 2, uri


def test_manifest_rows_that_cannot_be_read_are_rejected(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "list.csv").write_text(
        "path,label,split\na.jpg,cat,train\nmissing.jpg,cat,\n../outside.jpg,cat,\n/etc/passwd,cat,\na.jpg,cat,holdout\n")
    entries = entries_of(str(tmp_path / "list.csv"))
    assert rejected(entries) == {"missing.jpg": "missing", "../outside.jpg": "unsafe_path",
                                 "/etc/passwd": "unsafe_path", "a.jpg": "bad_split"}
    assert good(entries)["a.jpg"][:2] == ("cat", "train")


def test_manifest_without_a_path_column_is_a_clear_error(tmp_path):
    (tmp_path / "list.csv").write_text("file,label\na.jpg,cat\n")
    with pytest.raises(CnnpipeError, match="'path' column"):
        entries_of(str(tmp_path / "list.csv"))


def test_unknown_or_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(CnnpipeError, match="no such file or folder"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "x.rar").write_bytes(b"rar")
    with pytest.raises(CnnpipeError, match="not a folder"):
        open_source(str(tmp_path / "x.rar"))


def snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_tar_traversal_links_and_devices_are_rejected_and_nothing_is_written(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        def add(name, kind=tarfile.REGTYPE, data=b"", linkname=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, linkname, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("../evil.jpg", data=jpeg(1))
        add("/abs/evil.jpg", data=jpeg(2))
        add("cat/passwd.jpg", tarfile.SYMTYPE, linkname="/etc/passwd")
        add("cat/up.jpg", tarfile.SYMTYPE, linkname="../../x")
        add("cat/hard.jpg", tarfile.LNKTYPE, linkname="/etc/passwd")
        add("cat/fifo", tarfile.FIFOTYPE)
        add("cat/tty", tarfile.CHRTYPE)
        add("d", tarfile.SYMTYPE, linkname=str(tmp_path / "outside"))
        add("d/pwn.jpg", data=jpeg(3))
        add("cat/ok.jpg", data=jpeg(4))
    before = snapshot(tmp_path)
    entries = entries_of(str(archive))
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "outside").exists()
    assert rejected(entries) == {
        "../evil.jpg": "unsafe_path", "/abs/evil.jpg": "unsafe_path", "cat/passwd.jpg": "link", "cat/up.jpg": "link",
        "cat/hard.jpg": "link", "cat/fifo": "special_file", "cat/tty": "special_file", "d": "link"}
    # d/pwn.jpg is a plain member: read as bytes, never written through the link.
    assert set(good(entries)) == {"cat/ok.jpg", "d/pwn.jpg"}


def test_zip_slip_names_and_symlinks_are_rejected(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("../../z.jpg", "/abs.jpg", "C:\\win.jpg", "..\\back.jpg"):
            zf.writestr(name, jpeg(1))
        link = zipfile.ZipInfo("cat/link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("cat/ok.jpg", jpeg(2))
    entries = entries_of(str(archive))
    assert set(good(entries)) == {"cat/ok.jpg"}
    assert sorted(rejected(entries).values()) == ["link"] + ["unsafe_path"] * 4


def test_zip_bombs_are_capped_without_inflating_them(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("cat/zeros.jpg", "w") as member:
            for _ in range(200):
                member.write(bytes(1 << 20))
        zf.writestr("cat/ok.jpg", jpeg(1))
    assert archive.stat().st_size < 1 << 20
    entries = entries_of(str(archive), max_image_bytes=8 << 20)
    assert rejected(entries) == {"cat/zeros.jpg": "too_large"}
    assert set(good(entries)) == {"cat/ok.jpg"}


def test_zip_member_whose_declared_size_lies_is_capped(tmp_path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/big.jpg", bytes(50_000))
    raw = bytearray(archive.read_bytes())
    # Patch the central directory's uncompressed size (offset 24 of its record) to 100 bytes.
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24:central + 28] = (100).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    entries = entries_of(str(archive), max_image_bytes=1000)
    assert rejected(entries)["cat/big.jpg"] in {"too_large", "corrupt_member"}
    assert not good(entries)


def test_tar_streams_many_members_without_keeping_them(tmp_path):
    files = {f"cat/{i:05d}.jpg": b"x" for i in range(20_000)}
    archive = tar_of(files, tmp_path / "many.tar")
    source = open_source(str(archive))
    count = sum(1 for _ in source.entries())
    assert count == 20_000


def test_transient_read_errors_are_retried_with_capped_backoff():
    failures = iter([ConnectionError("reset"), TimeoutError("slow"), None])
    sleeps = []

    def read():
        failure = next(failures)
        if failure:
            raise failure
        return b"data"

    assert with_retries(read, sleep=sleeps.append, first_delay=1.0, max_delay=1.5) == b"data"
    assert sleeps == [1.0, 1.5]
    with pytest.raises(ConnectionError):
        with_retries(lambda: (_ for _ in ()).throw(ConnectionError("down")), attempts=3, sleep=sleeps.append)


def test_flaky_remote_folder_is_read_after_retries(monkeypatch):
    memory = fsspec.filesystem("memory")
    memory.pipe("/flaky/cat/1.jpg", jpeg(1))
    calls = {"n": 0}
    original = type(memory).cat_file

    def flaky(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("connection reset by peer")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(type(memory), "cat_file", flaky)
    sleeps = []
    monkeypatch.setattr("cnnpipe.sources.base.time.sleep", sleeps.append)
    assert set(good(entries_of("memory://flaky"))) == {"cat/1.jpg"}
    assert calls["n"] == 3 and sleeps == [0.2, 0.4]


def test_a_remote_object_gone_since_the_listing_is_missing_and_any_other_error_ends_the_read(monkeypatch):
    memory = fsspec.filesystem("memory")
    memory.pipe("/guarded/cat/1.jpg", jpeg(1))
    memory.pipe("/guarded/cat/2.jpg", jpeg(2))
    original = type(memory).cat_file
    failure: OSError = FileNotFoundError("/guarded/cat/1.jpg")

    def guarded(self, path, *args, **kwargs):
        if path.endswith("1.jpg"):
            raise failure
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(type(memory), "cat_file", guarded)
    entries = entries_of("memory://guarded")
    assert rejected(entries) == {"cat/1.jpg": "missing"} and set(good(entries)) == {"cat/2.jpg"}
    # As s3fs raises an expired token, and an error it does not know: not the object's, so not refused one by one.
    for failure in (PermissionError("ExpiredToken"), OSError(errno.EIO, "Internal Error")):
        with pytest.raises(OSError):
            entries_of("memory://guarded")


def test_a_shard_is_a_copy_and_the_source_stays_whole(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 6, "dog": 6})
    source = open_source(str(tmp_path / "src"))
    shards = [source.sharded(index, 3) for index in range(3)]
    assert source.shard is None and [shard.shard for shard in shards] == [(0, 3), (1, 3), (2, 3)]
    assert all(shard is not source and type(shard) is type(source) for shard in shards)
    parts = [[entry.path for entry in shard.entries()] for shard in shards]
    whole = [entry.path for entry in source.entries()]
    assert len(whole) == 12 and source.total == 12
    assert sorted(sum(parts, [])) == sorted(whole) and sum(1 for part in parts if part) >= 2
    assert [shard.total for shard in shards] == [len(part) for part in parts]


def test_file_that_changes_between_listing_and_reading_is_rejected(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 2})
    original = FolderSource._listing

    def stale_listing(self, root):
        listing = original(self, root)
        (Path(root) / listing[0][0]).write_bytes(b"\xff\xd8\xff")  # truncated after listing
        return listing

    monkeypatch.setattr(FolderSource, "_listing", stale_listing)
    entries = entries_of(str(tmp_path / "src"))
    assert rejected(entries) == {"cat/0000.jpg": "changed_during_read"}
    assert set(good(entries)) == {"cat/0001.jpg"}


def denied(monkeypatch, function: str, *paths: Path, code: int = errno.EACCES, module=os) -> None:
    """`module.<function>` raises OSError `code` for `paths`, as for a file or folder without permission or on
    a failing disk: these tests run as root in CI, where chmod takes nothing away (checked by hand as an
    unprivileged user too)."""
    real = getattr(module, function)
    refused = {str(path) for path in paths}

    def call(path, *args, **kwargs):
        if os.fspath(path) in refused:
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, function, call)


def test_files_and_folders_that_cannot_be_read_are_refused_by_name_and_the_rest_are_read(tmp_path, monkeypatch):
    root = tmp_path / "src"
    write_class_folders(root, {"cat": 2, "dog": 1, "owl": 1, "emu": 1})
    denied(monkeypatch, "open", root / "cat" / "0000.jpg")  # the file's own permission
    denied(monkeypatch, "scandir", root / "dog")  # a folder that cannot be listed
    denied(monkeypatch, "lstat", root / "owl" / "0000.jpg")  # a folder listed but not searchable
    denied(monkeypatch, "open", root / "emu" / "0000.jpg", code=errno.EIO)  # a bad sector
    entries = entries_of(str(root))
    assert rejected(entries) == {"cat/0000.jpg": "unreadable", "dog": "unreadable", "owl/0000.jpg": "unreadable",
                                 "emu/0000.jpg": "unreadable"}
    details = {entry.path: entry.reject_detail for entry in entries if entry.reject_reason}
    assert details["cat/0000.jpg"] == "cannot be read: Permission denied"
    assert details["dog"] == "a folder that cannot be listed: Permission denied"
    assert details["emu/0000.jpg"] == "cannot be read: Input/output error"
    assert set(good(entries)) == {"cat/0001.jpg"}


@pytest.mark.parametrize("function, path", [("open", "cat/0001.jpg"), ("scandir", "cat")])
def test_an_error_that_is_not_the_files_still_ends_the_read(tmp_path, monkeypatch, function, path):
    # Too many open files says nothing about this file: refusing it, and every one after it, would lose them.
    write_class_folders(tmp_path / "src", {"cat": 2})
    denied(monkeypatch, function, tmp_path / "src" / path, code=errno.EMFILE)
    with pytest.raises(OSError, match="Too many open files"):
        entries_of(str(tmp_path / "src"))


def test_files_and_folders_gone_since_the_listing_are_missing_or_passed_over(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 2, "dog": 1})
    original = FolderSource._listing

    def listing_then_removal(self, root):
        listing = original(self, root)
        (Path(root) / "cat" / "0000.jpg").unlink()
        return listing

    monkeypatch.setattr(FolderSource, "_listing", listing_then_removal)
    denied(monkeypatch, "scandir", tmp_path / "src" / "dog", code=errno.ENOENT)  # gone as the walk reached it
    entries = entries_of(str(tmp_path / "src"))
    assert rejected(entries) == {"cat/0000.jpg": "missing"} and set(good(entries)) == {"cat/0001.jpg"}


def test_a_source_folder_that_cannot_be_listed_is_an_error_not_an_empty_source(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 1})
    denied(monkeypatch, "scandir", tmp_path / "src")
    with pytest.raises(PermissionError):
        entries_of(str(tmp_path / "src"))


def test_a_manifest_row_whose_file_cannot_be_read_is_refused_with_its_label(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "b.jpg").write_bytes(jpeg(2))
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,cat\nb.jpg,dog\n")
    denied(monkeypatch, "open", tmp_path / "a.jpg", module=builtins)  # fsspec's local files open with it
    entries = entries_of(str(tmp_path / "labels.csv"))
    assert [(e.path, e.label, e.reject_reason) for e in entries] == [("a.jpg", "cat", "unreadable"), ("b.jpg", "dog", None)]


def test_oversized_files_are_rejected_before_reading(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 1})
    (tmp_path / "src" / "cat" / "huge.jpg").write_bytes(os.urandom(5000))
    entries = entries_of(str(tmp_path / "src"), max_image_bytes=4000)
    assert rejected(entries) == {"cat/huge.jpg": "too_large"}


def test_every_source_kind_names_its_explicit_splits_without_reading_images(tmp_path, monkeypatch):
    # train/ listed before val/, as a tar may: the whole source is what counts, in any order.
    files = {"train/cat/1.jpg": jpeg(1), "train/dog/2.jpg": jpeg(2), "loose/cat/3.jpg": jpeg(3),
             "test/cat/4.jpg": jpeg(4), "validation/dog/5.jpg": jpeg(5)}
    tar_of(files, tmp_path / "all.tar")
    tar_of(files, tmp_path / "all.tar.gz", "w:gz")
    tar_of({name: data for name, data in files.items() if not name.startswith("validation/")},
           tmp_path / "noval.tar.gz", "w:gz")
    with zipfile.ZipFile(tmp_path / "all.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    for name, data in files.items():
        if name.startswith("validation/"):
            continue
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(data)
    (tmp_path / "folder" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "folder" / "val" / "cat" / ".DS_Store").write_bytes(b"junk")  # skipped: not a val image
    (tmp_path / "list.csv").write_text("path,label,split\nfolder/loose/cat/3.jpg,cat,TRAIN\n"
                                       "folder/test/cat/4.jpg,cat,test\nfolder/loose/cat/3.jpg,cat,holdout\n")
    all_three = {"train", "val", "test"}
    expected = {str(tmp_path / "all.tar"): all_three, str(tmp_path / "all.tar.gz"): all_three,
                str(tmp_path / "all.zip"): all_three, str(tmp_path / "noval.tar.gz"): {"train", "test"},
                str(tmp_path / "folder"): {"train", "test"}, str(tmp_path / "list.csv"): {"train", "test"}}
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda *args: pytest.fail("read member data"))
    for uri, splits in expected.items():
        assert open_source(uri).explicit_splits() == splits, uri
        # A shard names what the whole source names.
        assert open_source(uri).sharded(2, 3).explicit_splits() == splits, uri
    write_class_folders(tmp_path / "plain", {"cat": 2})
    assert open_source(str(tmp_path / "plain")).explicit_splits() == set()


def test_a_folder_lists_once_for_its_splits_and_its_entries(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 3}, split="train")
    listings = []
    original = FolderSource._listing
    monkeypatch.setattr(FolderSource, "_listing", lambda self, root: listings.append(root) or original(self, root))
    source = open_source(str(tmp_path / "src"))
    assert source.explicit_splits() == {"train"}
    assert len(list(source.entries())) == 3 and len(listings) == 1
    assert len(list(source.entries())) == 3 and len(listings) == 2  # a second read lists afresh


def symlink_garden(tmp_path: Path) -> tuple[Path, Path]:
    """A source folder with every kind of link and special file, and a folder outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg(90))
    # Opening this would block until a writer came: refusing it must not open it.
    os.mkfifo(outside / "blocking.jpg")
    root = tmp_path / "source"
    write_class_folders(root, {"red": 2, "blue": 1})
    red = root / "red"
    (red / "inside.jpg").symlink_to("../blue/0000.jpg")
    (red / "outside.jpg").symlink_to(outside / "secret.jpg")
    (red / "passwd.jpg").symlink_to("/etc/passwd")
    (red / "fifo-outside.jpg").symlink_to(outside / "blocking.jpg")
    (red / "loop.jpg").symlink_to("loop.jpg")
    (red / "dangling.jpg").symlink_to("nothing.jpg")
    os.mkfifo(red / "fifo.jpg")
    (red / ".DS_Store").write_bytes(b"finder")
    (root / "linked-blue").symlink_to("blue")
    (root / "linked-outside").symlink_to(outside)
    return root, outside


SYMLINK_REJECTS = {
    "red/outside.jpg": "unsafe_path", "red/passwd.jpg": "unsafe_path", "red/fifo-outside.jpg": "unsafe_path",
    "red/loop.jpg": "broken_link", "red/dangling.jpg": "broken_link", "red/fifo.jpg": "special_file",
    "linked-blue": "link", "linked-outside": "unsafe_path",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_folder_follows_links_inside_it_and_refuses_the_rest_without_opening_them(tmp_path, scheme):
    root, _ = symlink_garden(tmp_path)
    source = open_source(f"{scheme}{root}")
    entries = list(source.entries())
    assert rejected(entries) == SYMLINK_REJECTS
    kept = good(entries)
    assert sorted(kept) == ["blue/0000.jpg", "red/0000.jpg", "red/0001.jpg", "red/inside.jpg"]
    assert kept["red/inside.jpg"] == ("red", None, (root / "blue" / "0000.jpg").read_bytes())
    assert source.hidden_skipped == 1


@pytest.mark.timeout(60)
def test_a_manifest_follows_the_same_link_rule(tmp_path):
    root, outside = symlink_garden(tmp_path)
    rows = ["red/0000.jpg", "red/inside.jpg", *(path for path in SYMLINK_REJECTS if path.startswith("red/")),
            "linked-outside/secret.jpg", "linked-blue/0000.jpg"]
    (root / "labels.csv").write_text("path,label\n" + "".join(f"{row},red\n" for row in rows))
    entries = entries_of(str(root / "labels.csv"))
    assert rejected(entries) == {**{path: reason for path, reason in SYMLINK_REJECTS.items() if path.startswith("red/")},
                                 "linked-outside/secret.jpg": "unsafe_path"}
    assert sorted(good(entries)) == ["linked-blue/0000.jpg", "red/0000.jpg", "red/inside.jpg"]


def test_a_device_file_in_a_folder_is_refused_unopened(tmp_path):
    root = tmp_path / "source"
    write_class_folders(root, {"red": 1})
    try:
        os.mknod(root / "red" / "zero.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device file needs CAP_MKNOD")
    assert rejected(entries_of(str(root))) == {"red/zero.jpg": "special_file"}


@pytest.mark.timeout(120)
def test_an_ingest_stores_the_readable_images_and_names_the_unreadable_one(tmp_path, monkeypatch):
    from cnnpipe.settings import Settings
    from cnnpipe.store import DatasetStore, IngestOptions

    write_class_folders(tmp_path / "src", {"cat": 3, "dog": 2})
    denied(monkeypatch, "open", tmp_path / "src" / "dog" / "0001.jpg")
    store = DatasetStore("partly", Settings(home=tmp_path / "home", mlflow_tracking_uri=""))
    with store.lock():
        summary = store.commit(store.stage(open_source(str(tmp_path / "src")), IngestOptions(workers=0)))
    assert [(r.path, r.reason, r.detail) for r in summary.rejected] == [
        ("dog/0001.jpg", "unreadable", "cannot be read: Permission denied")]
    assert summary.added == 4


@pytest.mark.timeout(120)
def test_an_ingest_records_link_refusals_and_counts_hidden_files(tmp_path):
    from cnnpipe.reports.markdown import ingest_markdown
    from cnnpipe.settings import Settings
    from cnnpipe.store import DatasetStore, IngestOptions

    root, _ = symlink_garden(tmp_path)
    store = DatasetStore("garden", Settings(home=tmp_path / "home", mlflow_tracking_uri=""))
    with store.lock():
        summary = store.commit(store.stage(open_source(str(root)), IngestOptions(workers=0)))
    # Followed, red/inside.jpg is blue/0000.jpg under a second label.
    assert {reject.path: reject.reason for reject in summary.rejected} == {**SYMLINK_REJECTS, "red/inside.jpg": "conflict"}
    assert summary.added == 3
    assert summary.hidden_skipped == 1
    assert "1 hidden files (dot-files, `__MACOSX/`) skipped by rule." in ingest_markdown(summary)


def _plain_names_or_none(path: Path) -> list[str] | None:
    from cnnpipe.sources.archives import _NotPlain, _plain_file_names

    with open(path, "rb") as raw:
        try:
            return list(_plain_file_names(raw))
        except _NotPlain:
            return None


def _varied_tar(path: Path, mode: str, fmt: int, extra: list[tarfile.TarInfo] = ()) -> None:
    with tarfile.open(path, mode, format=fmt) as tar:
        # A name over 100 characters is split into the ustar prefix; GNU and pax write it otherwise.
        prefixed = [(f"{'d' * 90}/{'e' * 60}/x.jpg", 7)] if fmt == tarfile.USTAR_FORMAT else []
        for name, size in [("train/cat/1.jpg", 0), ("train/dog/2.jpg", 513), *prefixed, ("v7dir/", 0)]:
            info = tarfile.TarInfo(name)
            info.size = size
            if name.endswith("/"):
                info.type = tarfile.AREGTYPE  # the old V7 way of writing a directory
            tar.addfile(info, io.BytesIO(b"\xff" * size))
        for kind, name in ((tarfile.DIRTYPE, "test"), (tarfile.SYMTYPE, "test/link.jpg"), (tarfile.FIFOTYPE, "fifo"),
                           (tarfile.LNKTYPE, "test/hard.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "train/cat/1.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
        for info in extra:
            tar.addfile(info, io.BytesIO(b"z" * info.size))


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
def test_a_tars_file_names_read_from_its_headers_alone_are_tarfiles_own(tmp_path, mode, fmt):
    path = tmp_path / "a.tar"
    _varied_tar(path, mode, fmt)
    with tarfile.open(path) as tar:
        expected = [member.name for member in tar if member.isfile()]
    assert len(expected) == (3 if fmt == tarfile.USTAR_FORMAT else 2)
    assert _plain_names_or_none(path) == expected


def test_what_only_tarfile_reads_falls_back_to_it_with_the_same_splits(tmp_path):
    long_name = tarfile.TarInfo(f"val/cat/{'n' * 120}.jpg")  # a GNU long name, or a pax header
    long_name.size = 3
    unicode_name = tarfile.TarInfo("val/chat/é.jpg")  # a pax header for a name that is not ASCII
    for fmt, extra in ((tarfile.GNU_FORMAT, [long_name]), (tarfile.PAX_FORMAT, [unicode_name])):
        path = tmp_path / f"{fmt}.tar.gz"
        _varied_tar(path, "w:gz", fmt, extra)
        assert _plain_names_or_none(path) is None
        assert open_source(str(path)).explicit_splits() == {"train", "val"}  # test/ holds links alone
    # A damaged stream is tarfile's to describe.
    whole = (tmp_path / f"{tarfile.GNU_FORMAT}.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(whole[:len(whole) // 2])
    assert _plain_names_or_none(tmp_path / "cut.tar.gz") is None


def _entries_and_end(path: Path, shard: tuple[int, int] | None = None) -> tuple[list[tuple], int, str | None]:
    """What a tar source yields, its hidden count, and the error it ends with, if any."""
    source = open_source(str(path), max_image_bytes=600)
    if shard:
        source = source.sharded(*shard)
    found = []
    try:
        for entry in source.entries():
            found.append((entry.path, entry.label, entry.split, entry.data, entry.reject_reason, entry.reject_detail))
    except Exception as exc:  # noqa: BLE001 - the end is what is compared
        return found, source.hidden_skipped, f"{type(exc).__name__}: {exc}"
    return found, source.hidden_skipped, None


def _hostile_members() -> list[tarfile.TarInfo]:
    members = []
    for name, size in (("../up.jpg", 3), ("train/cat/.DS_Store", 4), ("__MACOSX/train/cat/._1.jpg", 5),
                       ("train/cat/big.jpg", 700), ("train/cat/bad\udcff.jpg", 6), ("val/cat/ok.jpg", 7)):
        info = tarfile.TarInfo(name)
        info.size = size
        members.append(info)
    return members


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
def test_a_tars_entries_read_from_plain_headers_are_what_tarfile_gives(tmp_path, monkeypatch, mode, fmt):
    from cnnpipe.sources import archives

    # A pax header midway (a name that is not ASCII) makes the reading fall back to tarfile there.
    unicode_name = tarfile.TarInfo("val/chat/é.jpg")
    unicode_name.size = 8
    after = tarfile.TarInfo("val/dog/after.jpg")
    after.size = 9
    path = tmp_path / "a.tar"
    _varied_tar(path, mode, fmt, [*_hostile_members(), unicode_name, after])
    _varied_tar(tmp_path / "plain.tar", "w", fmt)
    compress = {"w": bytes, "w:gz": gzip.compress, "w:bz2": bz2.compress, "w:xz": lzma.compress}[mode]
    cut = tmp_path / "cut.tar"  # a whole stream of a tar that ends inside the data of train/dog/2.jpg
    cut.write_bytes(compress((tmp_path / "plain.tar").read_bytes()[:1300]))
    damaged = tmp_path / "damaged.tar"  # a stream cut short, if compressed
    damaged.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2] if mode != "w" else b"")
    cases = [(path, None), (path, (0, 2)), (path, (1, 2)), (cut, None), (damaged, None)]
    ours = [_entries_and_end(case, shard) for case, shard in cases]

    def only_tarfile(raw):
        raise archives._NotPlain
        yield

    monkeypatch.setattr(archives, "_plain_members", only_tarfile)
    assert ours == [_entries_and_end(case, shard) for case, shard in cases]
    found, hidden, end = ours[0]
    assert end is None and hidden == 2 and found[-1][0] == "val/dog/after.jpg"
    assert {reason for *_, reason, _ in found} >= {None, "unsafe_path", "link", "special_file", "too_large"}
    assert ours[1][0] and ours[2][0] and len(ours[1][0]) + len(ours[2][0]) == len(found)
    assert [entry[0] for entry in ours[3][0]] == ["train/cat/1.jpg"] and ours[3][2] == "ReadError: unexpected end of data"
    if mode == "w":
        assert ours[4] == ([], 0, "ReadError: empty file")


def test_a_local_file_reads_whole_whatever_its_listed_size(tmp_path, monkeypatch):
    from cnnpipe.sources import folder

    monkeypatch.setattr(folder, "_READ_CHUNK", 5)  # reads of several chunks, on a small file
    path = tmp_path / "image.jpg"
    data = bytes(range(256)) * 3
    path.write_bytes(data)
    for listed in (len(data), len(data) - 100, len(data) + 100, None, 0):
        assert folder._read_local(str(path), listed) == data
    path.write_bytes(b"")
    assert folder._read_local(str(path), 0) == b"" and folder._read_local(str(path), None) == b""
    with pytest.raises(FileNotFoundError):
        folder._read_local(str(tmp_path / "gone.jpg"), 3)
