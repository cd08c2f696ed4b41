"""Tar and zip archives as sources, streamed member by member and never extracted to disk."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import stat
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator

from cnnpipe.sources.base import SPLIT_NAMES, Entry, Source, UnsafePath, _bad_name, _is_utf8, safe_relative_path

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class TarSource(Source):
    kind = "tar"

    def explicit_splits(self) -> set[str]:
        # Headers only: the stream skips member data (one decompression pass for a .tar.gz).
        try:
            with self.fs.open(self.path, "rb") as raw:
                return self._splits_named(_plain_file_names(raw))
        except _NotPlain:
            pass
        with self.fs.open(self.path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            return self._splits_named(member.name for member in _forgetting(tar) if member.isfile())

    def _splits_named(self, names: Iterator[str]) -> set[str]:
        found: set[str] = set()
        for name in names:
            try:
                split = self._split_of(safe_relative_path(name))
            except UnsafePath:
                continue
            if split:
                found.add(split)
                if len(found) == len(set(SPLIT_NAMES.values())):
                    break
        return found

    def entries(self) -> Iterator[Entry]:
        self.hidden_skipped = 0
        # Plain headers are read here; at the first that only `tarfile` reads right (or damage), the
        # archive is read again by `tarfile`, past the members already taken.
        taken = 0
        try:
            with self.fs.open(self.path, "rb") as raw:
                for member in _plain_members(raw):
                    yield from self._member_entries(member.name, member.type, member.size, member.linkname,
                                                    member.read)
                    taken += 1
                return
        except _NotPlain:
            pass
        with self.fs.open(self.path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for index, member in enumerate(_forgetting(tar)):
                if index >= taken:
                    yield from self._member_entries(member.name, member.type, member.size, member.linkname,
                                                    lambda: tar.extractfile(member).read())

    def _member_entries(self, name: str, kind: bytes, size: int, linkname: str, read) -> Iterator[Entry]:
        if kind == tarfile.DIRTYPE or not self._mine(name):
            return
        if not _is_utf8(name):
            yield _bad_name(name)
            return
        try:
            path = safe_relative_path(name)
        except UnsafePath as exc:
            yield Entry(name, None, None, reject_reason="unsafe_path", reject_detail=str(exc))
            return
        link = "symlink" if kind == tarfile.SYMTYPE else "hardlink" if kind == tarfile.LNKTYPE else None
        passed_over = self._passed_over(
            path, size, link=link and f"{link} to {linkname!r} refused",
            special=None if kind in tarfile.REGULAR_TYPES else "not a regular file (device, FIFO or similar)")
        if passed_over is not None:
            yield from passed_over
            return
        yield self._labelled(path, read())


def _forgetting(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        tar.members.clear()  # stream mode remembers every member
        yield member


class _NotPlain(Exception):
    """A header that only `tarfile` reads right: pax or GNU long names, sparse files, base-256
    sizes, a pre-POSIX archive, or damage."""


_DECOMPRESSORS = ((b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw)), (b"BZh", bz2.BZ2File),
                  (b"\xfd7zXZ\x00", lzma.LZMAFile))
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_OTHER_TYPES = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE)
_BLOCK = tarfile.BLOCKSIZE
_DECOMPRESSED_BUFFER = 1 << 20
# What a damaged archive raises on its way through a decompressor: `tarfile` then says what it is.
_DAMAGE = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _plain_file_names(raw) -> Iterator[str]:
    """The names of the regular files in the tar stream `raw`, as `tarfile` names them (see `_plain_members`)."""
    return (member.name for member in _plain_members(raw) if member.type in _FILE_TYPES)


class _PlainMember:
    """A member of a plain header: what `tarfile.TarInfo` would say of it, and its data, once."""

    __slots__ = ("name", "type", "size", "linkname", "_stream", "taken")

    def __init__(self, name: str, kind: bytes, size: int, linkname: str, stream):
        self.name, self.type, self.size, self.linkname, self._stream, self.taken = name, kind, size, linkname, stream, 0

    def read(self) -> bytes:
        try:
            data = self._stream.read(self.size)
        except _DAMAGE:
            raise _NotPlain from None
        self.taken = len(data)
        if len(data) < self.size:  # cut short: `tarfile` says how
            raise _NotPlain
        return data


def _plain_members(raw) -> Iterator[_PlainMember]:
    """The members of the tar stream `raw` (compressed or not) as `tarfile` reads them, from the
    fields of plain ustar and GNU headers alone; `_NotPlain` at anything else, for the caller to
    ask `tarfile`. Parsing every header whole, `tarfile` took 1 s of the 60,000 headers of
    CIFAR-10's .tar.gz on 2 cores, which ingest reads twice: for its splits, then for its images."""
    magic = raw.read(6)
    if not raw.seekable():
        raise _NotPlain
    raw.seek(0)
    opener = next((opener for prefix, opener in _DECOMPRESSORS if magic.startswith(prefix)), None)
    # Buffered in C: a decompressor's own read and seek, in Python, cost more than the parsing, a call
    # for each header and each member's data.
    stream = io.BufferedReader(opener(raw), _DECOMPRESSED_BUFFER) if opener is not None else raw
    try:
        yield from _members_in_headers(stream)
    except _DAMAGE:
        raise _NotPlain from None


def _members_in_headers(stream) -> Iterator[_PlainMember]:
    encoding = sys.getfilesystemencoding()
    if not (header := stream.read(_BLOCK)):
        raise _NotPlain  # an empty file, which `tarfile` refuses
    while header:
        if header == tarfile.NUL * _BLOCK:
            return
        if len(header) < _BLOCK or header[257:262] != b"ustar":
            raise _NotPlain
        kind = header[156:157]
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            checksum = int(header[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            raise _NotPlain from None
        # The sum of the header's bytes, its checksum field counted as spaces.
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32 or kind not in _FILE_TYPES + _OTHER_TYPES:
            raise _NotPlain
        name = header[:100].split(b"\0", 1)[0].decode(encoding, "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode(encoding, "surrogateescape")
        linkname = header[157:257].split(b"\0", 1)[0].decode(encoding, "surrogateescape")
        if kind == tarfile.AREGTYPE and name.endswith("/"):  # a directory, in the old V7 way
            kind = tarfile.DIRTYPE
        if kind == tarfile.DIRTYPE:
            name = name.rstrip("/")
        member = _PlainMember(f"{prefix}/{name}" if prefix else name, kind, size, linkname, stream)
        yield member
        # Only regular files' data follows their header in the stream.
        stored = -(-size // _BLOCK) * _BLOCK if kind in _FILE_TYPES else 0
        if stored > member.taken:
            stream.seek(stored - member.taken, 1)
        header = stream.read(_BLOCK)


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
