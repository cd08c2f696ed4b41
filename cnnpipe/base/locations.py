"""Where a dataset store keeps its files: a local folder, or any fsspec filesystem.

A local folder publishes a version by one directory rename. Object storage (S3, GCS,
memory://) renames nothing, but each object appears whole or not at all: a version's
parts are uploaded first and its `version.json` last, with an exclusive create, so that
object commits it, and a version folder without one is debris of a crashed upload.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
from pathlib import Path

import fsspec

from cnn.failpoints import failpoint
from cnnpipe.base.fsutil import atomic_write_json, fsync_dir
from cnnpipe.errors import CnnpipeError

log = logging.getLogger(__name__)

VERSION = re.compile(r"v\d{6}")


class DamagedJson(CnnpipeError):
    """A file of the store that is there but does not parse: truncated or overwritten."""


def _parsed(data: bytes, where: object) -> object:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise DamagedJson(f"{where}: not valid JSON ({exc})") from None


class Folder:
    """A store in a local folder: a version is published by one directory rename."""

    filesystem = None  # pyarrow's own local filesystem

    def __init__(self, path: Path):
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def file(self, relative: str) -> Path:
        return self.path / relative

    def read_json(self, relative: str):
        path = self.path / relative
        return _parsed(path.read_bytes(), path) if path.exists() else None

    def write_json(self, relative: str, value: object) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / relative, value)

    def copy(self, relative: str, to: str) -> None:
        shutil.copyfile(self.path / relative, self.path / to)

    def children(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []

    def versions(self) -> list[str]:
        return [name for name in self.children() if VERSION.fullmatch(name)]

    def publish(self, staged: Path, version: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        failpoint("store.before_commit")
        os.rename(staged, self.path / version)
        fsync_dir(self.path)

    def discard_debris(self) -> None:
        """A rename leaves none."""


class ObjectStore:
    """A store on any fsspec filesystem (S3, GCS, memory://). Each object appears whole or
    not at all, so uploading a version's `version.json` last is what commits it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.filesystem, self.path = fsspec.core.url_to_fs(self.url)

    def __str__(self) -> str:
        return self.url

    def file(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def read_json(self, relative: str):
        try:
            data = self.filesystem.cat_file(self.file(relative))
        except FileNotFoundError:
            return None
        return _parsed(data, f"{self.url}/{relative}")

    def write_json(self, relative: str, value: object) -> None:
        self.filesystem.pipe_file(self.file(relative), json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    def copy(self, relative: str, to: str) -> None:
        self.filesystem.copy(self.file(relative), self.file(to))

    def children(self) -> list[str]:
        # Listings are cached per process; another host may have committed since.
        self.filesystem.invalidate_cache(self.path)
        if not self.filesystem.isdir(self.path):
            return []
        return sorted(posixpath.basename(entry["name"].rstrip("/"))
                      for entry in self.filesystem.ls(self.path, detail=True) if entry["type"] == "directory")

    def versions(self) -> list[str]:
        self.filesystem.invalidate_cache(self.path)
        committed = self.filesystem.glob(f"{self.path}/v[0-9][0-9][0-9][0-9][0-9][0-9]/version.json")
        return sorted(posixpath.basename(posixpath.dirname(path)) for path in committed)

    def publish(self, staged: Path, version: str) -> None:
        target = self.file(version)
        if self.filesystem.exists(f"{target}/version.json"):
            raise self._lost_race(version)
        if self.filesystem.exists(target):
            self.filesystem.rm(target, recursive=True)
        for part in sorted(staged.glob("part-*.parquet")):
            self.filesystem.put_file(str(part), f"{target}/{part.name}")
        failpoint("store.before_commit")
        try:
            # Exclusive: of two writers on different hosts, one commits and the other fails.
            self.filesystem.pipe_file(f"{target}/version.json", (staged / "version.json").read_bytes(), mode="create")
        except OSError:  # FileExistsError, or S3's 412 Precondition Failed
            if self.filesystem.exists(f"{target}/version.json"):
                raise self._lost_race(version) from None
            raise
        shutil.rmtree(staged)

    def _lost_race(self, version: str) -> CnnpipeError:
        return CnnpipeError(f"{self.url}/{version} was committed by another writer meanwhile; rerun to add "
                            "what is still new (one writer per dataset at a time: see deploy/README.md)")

    def discard_debris(self) -> None:
        """Remove version folders whose upload died before their `version.json`."""
        committed = set(self.versions())
        for name in self.children():
            if VERSION.fullmatch(name) and name not in committed:
                log.warning("%s/%s: removing the parts of an upload that never committed", self.url, name)
                self.filesystem.rm(self.file(name), recursive=True)


def location(url: str) -> Folder | ObjectStore:
    if "://" in url and not url.startswith("file://"):
        return ObjectStore(url)
    return Folder(Path(url.removeprefix("file://")))
