"""Tar and zip archives as sources, streamed member by member and never extracted to disk."""

from __future__ import annotations

import stat
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
                except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:
                    yield Entry(path, None, None, reject_reason="corrupt_member", reject_detail=str(exc))
                    continue
                if len(data) > self.max_image_bytes:
                    yield self._too_large(path, len(data))
                    continue
                yield self._labelled(path, data)
