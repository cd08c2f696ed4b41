"""Image sources: class folders, tar/zip archives and CSV manifests, local or behind fsspec URLs.

A source yields `Entry` objects with the bytes already read, so archives stream member by
member and nothing is ever extracted to disk. Members that are unsafe (absolute paths,
`..`, links, devices), too large, or named in bytes that are not UTF-8 become rejected
entries; the rest of the source carries on.
Ingestion and classification share this module, so both refuse exactly the same things.

Labels come from the layout: a file's parent folder is its class, and a grandparent named
train, val (valid, validation) or test is its split. Dot-files and `__MACOSX/` are skipped
and counted (`Source.hidden_skipped`).

Symbolic links in folders and manifests follow one rule: a link whose target resolves outside
the source's root is refused as `unsafe_path` without being opened; one inside is followed to
a file. A link to a folder is refused as `link` (folders are not walked through links, so no
loop can form), a link that loops or leads nowhere as `broken_link`, and FIFOs, devices and
sockets as `special_file`, never opened, so none can block a run.
`Source.explicit_splits()` says which of those splits a whole source names, before (and
without) reading its images: ingestion decides from it whether to carve a validation
split out of `train`.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import posixpath
import re
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cnnpipe.errors import CnnpipeError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
TRANSIENT_ERRORS = (ConnectionError, TimeoutError)
NOT_REGULAR = "not a regular file (FIFO, device or socket)"


@dataclass(frozen=True)
class Entry:
    path: str
    label: str | None
    split: str | None
    data: bytes | None = None
    reject_reason: str | None = None
    reject_detail: str = ""
    expected_sha256: str | None = None
    # The content id when the source already knows it (a dataset in the store).
    content_sha256: str | None = None


class UnsafePath(ValueError):
    pass


def safe_relative_path(name: str) -> str:
    """Normalise an archive or manifest path, refusing anything that could leave its root."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise UnsafePath("absolute path")
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePath("path escapes the source with '..'")
    if not parts:
        raise UnsafePath("empty path")
    return "/".join(parts)


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_name(path: str) -> Entry:
    """The reject for a name whose bytes are not UTF-8. Python hands such bytes over as lone
    surrogates, which Parquet, DuckDB and JSON readers refuse: the name is kept with them
    escaped (`bad\\xff.png`), so that the reject itself can be stored and shown."""
    shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return Entry(shown, None, None, reject_reason="bad_name", reject_detail="the name is not valid UTF-8: rename it")


class Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def entry(self, path: str, label: str | None = None, split: str | None = None) -> Entry:
        return Entry(path, label, split, reject_reason=self.reason, reject_detail=self.detail)


def regular_file_size(path: str, root: str) -> int:
    """The size of the local file at `path`, reached directly or through a link that stays
    inside `root` (a real path); anything else raises `Refused`. Only the last component is
    looked at as a link. Nothing is opened, so a FIFO cannot block."""
    status = os.lstat(path)
    if stat.S_ISLNK(status.st_mode):
        if not inside(os.path.realpath(path), root):
            raise Refused("unsafe_path", "a symbolic link to a file outside the source")
        try:
            status = os.stat(path)
        except OSError:
            raise Refused("broken_link", "a symbolic link that loops or leads to no file") from None
        if stat.S_ISDIR(status.st_mode):
            raise Refused("link", "a symbolic link to a folder: folders are not followed through links")
    if not stat.S_ISREG(status.st_mode):
        raise Refused("special_file", NOT_REGULAR)
    return status.st_size


def inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


def label_and_split(path: str) -> tuple[str | None, str | None]:
    parts = path.split("/")
    label = parts[-2] if len(parts) >= 2 else None
    split = SPLIT_NAMES.get(parts[-3].lower()) if len(parts) >= 3 else None
    return label, split


@functools.lru_cache(maxsize=4096)
def _folder_label_and_split(folder: str) -> tuple[str | None, str | None]:
    # Every file of a folder has the same label and split: work them out once per folder.
    return label_and_split(f"{folder}/file")


def _skipped(path: str) -> bool:
    parts = path.split("/")
    return parts[-1].startswith(".") or "__MACOSX" in parts


def with_retries(read: Callable[[], bytes], attempts: int = 4, first_delay: float = 0.2,
                 max_delay: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> bytes:
    """Retry transient network errors with capped exponential backoff."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except TRANSIENT_ERRORS:
            if attempt == attempts:
                raise
            sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


class Source:
    """A readable set of images behind one URI."""

    kind = "source"
    # Why an entry has no label, for ingestion to say when it refuses one.
    unlabelled = "expected <class>/<file> or <split>/<class>/<file>"

    def __init__(self, uri: str, fs: fsspec.AbstractFileSystem, path: str,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.uri = uri
        self.fs = fs
        self.path = path
        self.max_image_bytes = max_image_bytes
        # Known up front for folders, zips and manifests; tar streams cannot tell.
        self.total: int | None = None
        # (index, count): read only this shard's members, so that shards can run in parallel.
        self.shard: tuple[int, int] | None = None
        # Dot-files and `__MACOSX/` members passed over by the last entries(), for the summary.
        self.hidden_skipped = 0

    def entries(self) -> Iterator[Entry]:
        raise NotImplementedError

    def explicit_splits(self) -> set[str]:
        """The splits ("train", "val", "test") that the whole source names by folder or column,
        shard or not, read from listings and headers only. A source that cannot tell names none."""
        return set()

    def sharded(self, index: int, count: int) -> Source:
        """This source, restricted to one of `count` disjoint shards that together cover it."""
        self.shard = (index, count)
        return self

    def _mine(self, key: str) -> bool:
        if self.shard is None:
            return True
        index, count = self.shard
        return zlib.crc32(key.encode("utf-8", "surrogateescape")) % count == index

    def _labelled(self, path: str, data: bytes) -> Entry:
        folder = path.rpartition("/")[0]
        label, split = _folder_label_and_split(folder) if folder else (None, None)
        return Entry(path, label, split, data)

    @staticmethod
    def _split_of(path: str) -> str | None:
        folder = path.rpartition("/")[0]
        return _folder_label_and_split(folder)[1] if folder and not _skipped(path) else None

    def _too_large(self, path: str, size: int) -> Entry:
        return Entry(path, None, None, reject_reason="too_large",
                     reject_detail=f"{size} bytes is over the {self.max_image_bytes} byte limit")

    @property
    def _local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)


class FolderSource(Source):
    kind = "folder"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The listing taken by explicit_splits(), which the next entries() reuses.
        self._listed: list[tuple[str, int | None, Refused | None]] | None = None

    def explicit_splits(self) -> set[str]:
        self._listed = self._listing(self.path.rstrip("/"))
        return {split for rel, _, refused in self._listed if not refused and (split := self._split_of(rel))}

    def entries(self) -> Iterator[Entry]:
        root = self.path.rstrip("/")
        listed, self._listed = self._listed, None
        mine = [item for item in (listed if listed is not None else self._listing(root)) if self._mine(item[0])]
        files = [item for item in mine if not _skipped(item[0])]
        self.hidden_skipped = len(mine) - len(files)
        self.total = len(files)
        for rel, size, refused in files:
            if not _is_utf8(rel):
                yield _bad_name(rel)
                continue
            if refused:
                yield refused.entry(rel)
                continue
            if size is not None and size > self.max_image_bytes:
                yield self._too_large(rel, size)
                continue
            full = f"{root}/{rel}"
            data = self._read(full)
            if size is not None and len(data) != size:
                # The file changed between listing and reading: read once more, then give up.
                data = self._read(full)
                if len(data) != size:
                    yield Entry(rel, None, None, reject_reason="changed_during_read",
                                reject_detail=f"listed as {size} bytes, read {len(data)}")
                    continue
            yield self._labelled(rel, data)

    def _listing(self, root: str) -> list[tuple[str, int | None, Refused | None]]:
        """(path, size, why it is refused or None) for every file of the folder, sorted."""
        if not self._local:
            special = Refused("special_file", NOT_REGULAR)
            listing = self.fs.find(root, detail=True)
            return sorted((posixpath.relpath(p, root), info.get("size"), None if info.get("type") == "file" else special)
                          for p, info in listing.items())
        # fsspec's local filesystem costs ~50 us a file; plain os calls keep listing cheap.
        real_root = os.path.realpath(root)
        found = []
        for folder, subfolders, names in os.walk(root):
            rel_folder = os.path.relpath(folder, root)
            # os.walk lists a link to a folder among the subfolders, and does not enter it.
            linked = [name for name in subfolders if os.path.islink(os.path.join(folder, name))]
            for name in names + linked:
                rel = name if rel_folder == "." else f"{rel_folder}/{name}"
                try:
                    found.append((rel, regular_file_size(f"{root}/{rel}", real_root), None))
                except FileNotFoundError:
                    continue
                except Refused as refused:
                    found.append((rel, None, refused))
        return sorted(found, key=lambda item: item[0])

    def _read(self, full: str) -> bytes:
        if self._local:
            with open(full, "rb") as handle:
                return handle.read()
        return with_retries(lambda: self.fs.cat_file(full))


class TarSource(Source):
    kind = "tar"

    def explicit_splits(self) -> set[str]:
        # Headers only: the stream skips member data (one decompression pass for a .tar.gz).
        found: set[str] = set()
        with self.fs.open(self.path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                tar.members.clear()
                if not member.isfile():
                    continue
                try:
                    split = self._split_of(safe_relative_path(member.name))
                except UnsafePath:
                    continue
                if split:
                    found.add(split)
                    if len(found) == len(set(SPLIT_NAMES.values())):
                        break
        return found

    def entries(self) -> Iterator[Entry]:
        self.hidden_skipped = 0
        with self.fs.open(self.path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                # Stream mode remembers every member; forget them so millions stay cheap.
                tar.members.clear()
                if member.isdir() or not self._mine(member.name):
                    continue
                if not _is_utf8(member.name):
                    yield _bad_name(member.name)
                    continue
                try:
                    path = safe_relative_path(member.name)
                except UnsafePath as exc:
                    yield Entry(member.name, None, None, reject_reason="unsafe_path", reject_detail=str(exc))
                    continue
                if member.issym() or member.islnk():
                    kind = "symlink" if member.issym() else "hardlink"
                    yield Entry(path, None, None, reject_reason="link",
                                reject_detail=f"{kind} to {member.linkname!r} refused")
                    continue
                if not member.isfile():
                    yield Entry(path, None, None, reject_reason="special_file",
                                reject_detail="not a regular file (device, FIFO or similar)")
                    continue
                if _skipped(path):
                    self.hidden_skipped += 1
                    continue
                if member.size > self.max_image_bytes:
                    yield self._too_large(path, member.size)
                    continue
                yield self._labelled(path, tar.extractfile(member).read())


class ZipSource(Source):
    kind = "zip"

    def explicit_splits(self) -> set[str]:
        found: set[str] = set()
        with self.fs.open(self.path, "rb") as raw, zipfile.ZipFile(raw) as archive:
            for info in archive.infolist():
                try:
                    split = None if info.is_dir() else self._split_of(safe_relative_path(info.filename))
                except UnsafePath:
                    continue
                if split:
                    found.add(split)
        return found

    def entries(self) -> Iterator[Entry]:
        self.hidden_skipped = 0
        with self.fs.open(self.path, "rb") as raw, zipfile.ZipFile(raw) as archive:
            members = [info for info in archive.infolist() if not info.is_dir() and self._mine(info.filename)]
            self.total = len(members)
            for info in members:
                try:
                    path = safe_relative_path(info.filename)
                except UnsafePath as exc:
                    yield Entry(info.filename, None, None, reject_reason="unsafe_path", reject_detail=str(exc))
                    continue
                # Zips made off Unix, or by Python's writestr, carry no file type: regular then.
                file_type = stat.S_IFMT(info.external_attr >> 16)
                if file_type == stat.S_IFLNK:
                    yield Entry(path, None, None, reject_reason="link", reject_detail="symlink refused")
                    continue
                if file_type not in (0, stat.S_IFREG):
                    yield Entry(path, None, None, reject_reason="special_file",
                                reject_detail="not a regular file")
                    continue
                if _skipped(path):
                    self.hidden_skipped += 1
                    continue
                if info.file_size > self.max_image_bytes:
                    yield self._too_large(path, info.file_size)
                    continue
                try:
                    with archive.open(info) as member:
                        # The declared size can lie: cap what is actually inflated.
                        data = member.read(self.max_image_bytes + 1)
                except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:
                    yield Entry(path, None, None, reject_reason="corrupt_member", reject_detail=str(exc))
                    continue
                if len(data) > self.max_image_bytes:
                    yield self._too_large(path, len(data))
                    continue
                yield self._labelled(path, data)


class ManifestSource(Source):
    """A CSV with `path,label[,split][,sha256]`, paths relative to the manifest."""

    kind = "manifest"
    unlabelled = "its row in the manifest has no label: fill in the label column"

    def explicit_splits(self) -> set[str]:
        return {split for row in self._rows() if (split := SPLIT_NAMES.get((row.get("split") or "").strip().lower()))}

    def _rows(self) -> list[dict]:
        text = with_retries(lambda: self.fs.cat_file(self.path)).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and "path" not in rows[0]:
            raise CnnpipeError(f"{self.uri}: a manifest needs a 'path' column, found {list(rows[0])}")
        return rows

    def entries(self) -> Iterator[Entry]:
        base = posixpath.dirname(self.path)
        real_base = os.path.realpath(base) if self._local else None
        rows = self._rows()
        numbered = [(line, row) for line, row in enumerate(rows, start=2) if self._mine(f"{line}")]
        self.total = len(numbered)
        for line, row in numbered:
            name = (row.get("path") or "").strip()
            try:
                rel = safe_relative_path(name)
            except UnsafePath as exc:
                yield Entry(name or f"<line {line}>", None, None, reject_reason="unsafe_path",
                            reject_detail=str(exc))
                continue
            label = (row.get("label") or "").strip() or None
            split_name = (row.get("split") or "").strip().lower()
            split = SPLIT_NAMES.get(split_name) if split_name else None
            if split_name and split is None:
                yield Entry(rel, label, None, reject_reason="bad_split",
                            reject_detail=f"split {split_name!r} is not train, val or test")
                continue
            full = f"{base}/{rel}" if base else rel
            try:
                if real_base is None:
                    size = self.fs.size(full)
                elif inside(os.path.realpath(os.path.dirname(full)), real_base):
                    size = regular_file_size(full, real_base)
                else:
                    raise Refused("unsafe_path", "its folder is a symbolic link to a folder outside the manifest's")
                if size is not None and size > self.max_image_bytes:
                    yield self._too_large(rel, size)
                    continue
                data = with_retries(lambda: self.fs.cat_file(full))
            except FileNotFoundError:
                yield Entry(rel, label, split, reject_reason="missing", reject_detail="file not found")
                continue
            except Refused as refused:
                yield refused.entry(rel, label, split)
                continue
            expected = (row.get("sha256") or "").strip().lower() or None
            yield Entry(rel, label, split, data, expected_sha256=expected)


def open_source(uri: str, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Source:
    """Pick the source kind from what `uri` points at."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise CnnpipeError(f"{uri}: no such file or folder")
    lower = path.lower()
    if fs.isdir(path):
        kind = FolderSource
    elif lower.endswith(TAR_SUFFIXES):
        kind = TarSource
    elif lower.endswith(".zip"):
        kind = ZipSource
    elif lower.endswith(".csv"):
        kind = ManifestSource
    else:
        raise CnnpipeError(f"{uri}: not a folder, .tar, .tar.gz, .zip or .csv manifest")
    return kind(canonical_uri(fs, path), fs, path, max_image_bytes)


def canonical_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)
