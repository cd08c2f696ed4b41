"""Tar and zip archives as sources, streamed member by member and never extracted to disk."""

from __future__ import annotations

import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterator

from cnnpipe.sources.base import SPLIT_NAMES, Entry, Source, UnsafePath, _bad_name, _is_utf8, safe_relative_path

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


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
                kind = "symlink" if member.issym() else "hardlink" if member.islnk() else None
                passed_over = self._passed_over(
                    path, member.size, link=kind and f"{kind} to {member.linkname!r} refused",
                    special=None if member.isfile() else "not a regular file (device, FIFO or similar)")
                if passed_over is not None:
                    yield from passed_over
                    continue
                yield self._labelled(path, tar.extractfile(member).read())


class ZipSource(Source):
    kind = "zip"

    def explicit_splits(self) -> set[str]:
        found: set[str] = set()
        with self.fs.open(self.path, "rb") as raw, _ZipFile(raw) as archive:
            for info in archive.infolist():
                if not _is_utf8(info.filename):
                    continue
                try:
                    split = None if info.is_dir() else self._split_of(safe_relative_path(info.filename))
                except UnsafePath:
                    continue
                if split:
                    found.add(split)
        return found

    def entries(self) -> Iterator[Entry]:
        self.hidden_skipped = 0
        with self.fs.open(self.path, "rb") as raw, _ZipFile(raw) as archive:
            members = [info for info in archive.infolist() if not info.is_dir() and self._mine(info.filename)]
            self.total = len(members)
            for info in members:
                if not _is_utf8(info.filename):
                    yield _bad_name(info.filename)
                    continue
                try:
                    path = safe_relative_path(info.filename)
                except UnsafePath as exc:
                    yield Entry(info.filename, None, None, reject_reason="unsafe_path", reject_detail=str(exc))
                    continue
                # Zips made off Unix, or by Python's writestr, carry no file type: regular then.
                file_type = stat.S_IFMT(info.external_attr >> 16)
                passed_over = self._passed_over(
                    path, info.file_size, link="symlink refused" if file_type == stat.S_IFLNK else None,
                    special=None if file_type in (0, stat.S_IFREG) else "not a regular file")
                if passed_over is not None:
                    yield from passed_over
                    continue
                try:
                    with archive.open(info) as member:
                        # The declared size can lie: cap what is actually inflated.
                        data = member.read(self.max_image_bytes + 1)
                # UnicodeDecodeError: a local header that flags as UTF-8 a name its directory entry does not.
                except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, UnicodeDecodeError) as exc:
                    yield Entry(path, None, None, reject_reason="corrupt_member", reject_detail=str(exc))
                    continue
                if len(data) > self.max_image_bytes:
                    yield self._too_large(path, len(data))
                    continue
                yield self._labelled(path, data)


# APPNOTE.TXT 4.3.12: a central directory record, then its name, extra field and comment.
_CD_FLAGS, _CD_FLAGS_AT = 5, 8  # the field's index in the record, and its byte offset
_CD_LENGTHS = slice(12, 15)
_UTF8_FLAG = 0x800


class _ZipFile(zipfile.ZipFile):
    """A `ZipFile` that lists a member whose name is flagged UTF-8 but is not, where
    `zipfile` refuses the whole archive: its `filename` keeps the bytes that are not
    UTF-8 as lone surrogates, as `os.fsdecode` would, for the source to reject it."""

    def _RealGetContents(self) -> None:
        try:
            super()._RealGetContents()
            return
        except UnicodeDecodeError:
            pass
        # `start_dir` is set before any name is read. Read the directory again with the
        # lying flags cleared, so that those names decode (as cp437) instead of failing.
        real = self.fp
        real.seek(self.start_dir)
        directory, lying = _clear_lying_utf8_flags(real.read())
        self.filelist, self.NameToInfo = [], {}
        self.fp = _Overlaid(real, self.start_dir, directory)
        try:
            super()._RealGetContents()
        finally:
            self.fp = real
        for index, name in lying.items():
            info = self.filelist[index]
            del self.NameToInfo[info.filename]
            info.filename, info.flag_bits = name, info.flag_bits | _UTF8_FLAG
            self.NameToInfo[name] = info


def _clear_lying_utf8_flags(directory: bytes) -> tuple[bytes, dict[int, str]]:
    """`directory` (the central directory and what follows it) with the UTF-8 flag cleared
    on records whose names are not UTF-8, and those names by record index."""
    patched, lying, offset, index = bytearray(directory), {}, 0, 0
    while directory[offset:offset + 4] == zipfile.stringCentralDir:
        record = struct.unpack_from(zipfile.structCentralDir, directory, offset)
        name_length, extra_length, comment_length = record[_CD_LENGTHS]
        name_at = offset + zipfile.sizeCentralDir
        name = directory[name_at:name_at + name_length].decode("utf-8", "surrogateescape")
        if record[_CD_FLAGS] & _UTF8_FLAG and not _is_utf8(name):
            struct.pack_into("<H", patched, offset + _CD_FLAGS_AT, record[_CD_FLAGS] & ~_UTF8_FLAG)
            lying[index] = name
        offset = name_at + name_length + extra_length + comment_length
        index += 1
    return bytes(patched), lying


class _Overlaid:
    """A read-only file that reads as `raw`, except that from `start` on it reads as `tail`
    (of the same length)."""

    def __init__(self, raw, start: int, tail: bytes):
        self.raw, self.start, self.tail = raw, start, tail

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        position = self.raw.tell()
        data = self.raw.read(size)
        before = max(self.start - position, 0)
        if before >= len(data):
            return data
        return data[:before] + self.tail[position + before - self.start:position + len(data) - self.start]
