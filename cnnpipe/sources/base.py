"""What every source shares: `Entry`, `Source`, refusals, path safety, labels from paths, retries."""

from __future__ import annotations

import copy
import errno
import functools
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import fsspec

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
TRANSIENT_ERRORS = (ConnectionError, TimeoutError)
NOT_REGULAR = "not a regular file (FIFO, device or socket)"


# Not frozen: a frozen dataclass sets each field through object.__setattr__, a microsecond an entry, and a
# folder of small images yields tens of thousands a second. Nothing changes an entry once it is made.
@dataclass(slots=True)
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


_DRIVE = re.compile(r"[A-Za-z]:")


def safe_relative_path(name: str) -> str:
    """Normalise an archive or manifest path, refusing anything that could leave its root."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise UnsafePath("absolute path")
    parts = unified.split("/")
    if "" in parts or "." in parts:
        parts = [part for part in parts if part not in ("", ".")]
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


# What reading or listing a local file can fail with that is that file's own fault: it is refused and
# the rest are read. Anything else (too many open files, say) ends the run, which a rerun resumes.
_FILE_ERRORS = (PermissionError, IsADirectoryError)
_FILE_ERRNOS = {errno.EIO, errno.ELOOP, errno.ENXIO, errno.ENAMETOOLONG}


def file_refusal(exc: OSError, local: bool = True) -> Refused | None:
    """Why a file whose reading raised `exc` is refused, or None where the error is not the file's.
    On remote storage only a missing object is its own: s3fs raises PermissionError for an expired
    token as for a denied object, and EIO for any error it does not know, so that refusing those
    would refuse every file left in a long run."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return Refused("missing", "file not found")
    if local and (isinstance(exc, _FILE_ERRORS) or exc.errno in _FILE_ERRNOS):
        return Refused("unreadable", f"cannot be read: {exc.strerror or exc}")
    return None


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
                 max_delay: float = 5.0, sleep: Callable[[float], None] | None = None) -> bytes:
    """Retry transient network errors with capped exponential backoff (`sleep`: time.sleep)."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except TRANSIENT_ERRORS:
            if attempt == attempts:
                raise
            (sleep or time.sleep)(delay)
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
        """A shallow copy of this source, restricted to one of `count` disjoint shards that
        together cover it; this source itself is left whole."""
        shard = copy.copy(self)
        shard.shard = (index, count)
        return shard

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

    def _passed_over(self, path: str, size: int, link: str | None = None,
                     special: str | None = None) -> list[Entry] | None:
        """None for an archive member to read; else what to yield instead of it: its refusal as
        a link or a special file (`link`, `special`: why), nothing for a hidden one (counted in
        `hidden_skipped`), or its `too_large` refusal."""
        if link:
            return [Entry(path, None, None, reject_reason="link", reject_detail=link)]
        if special:
            return [Entry(path, None, None, reject_reason="special_file", reject_detail=special)]
        if _skipped(path):
            self.hidden_skipped += 1
            return []
        if size > self.max_image_bytes:
            return [self._too_large(path, size)]
        return None

    def _too_large(self, path: str, size: int) -> Entry:
        return Entry(path, None, None, reject_reason="too_large",
                     reject_detail=f"{size} bytes is over the {self.max_image_bytes} byte limit")

    @property
    def _local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem  # loaded with the `fs` that a source holds

        return isinstance(self.fs, LocalFileSystem)
