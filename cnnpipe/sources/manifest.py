"""A CSV manifest (`path,label[,split][,sha256]`) as a source, its paths relative to it."""

from __future__ import annotations

import codecs
import csv
import io
import os
import posixpath
from collections.abc import Iterator

from cnnpipe.errors import CnnpipeError
from cnnpipe.sources.base import SPLIT_NAMES, Entry, Refused, Source, UnsafePath, file_refusal, inside, \
    regular_file_size, safe_relative_path, with_retries


class ManifestSource(Source):
    """A CSV with `path,label[,split][,sha256]`, paths relative to the manifest."""

    kind = "manifest"
    unlabelled = "its row in the manifest has no label: fill in the label column"

    def explicit_splits(self) -> set[str]:
        return {split for row in self._rows() if (split := SPLIT_NAMES.get((row.get("split") or "").strip().lower()))}

    def _rows(self, needs_path: bool = True) -> list[dict]:
        raw = with_retries(lambda: self.fs.cat_file(self.path))
        body = raw.removeprefix(codecs.BOM_UTF8)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            at = exc.start + len(raw) - len(body)  # an offset into the file as saved, BOM included
            raise CnnpipeError(f"{self.uri}: not UTF-8 text at byte {at} ({raw[at]:#04x}): "
                               "save the manifest as UTF-8") from None
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and "path" not in rows[0] and (needs_path or "sha256" not in rows[0]):
            wanted = "a 'path' column" if needs_path else "a 'path' or a 'sha256' column"
            raise CnnpipeError(f"{self.uri}: a manifest needs {wanted}, found {list(rows[0])}")
        return rows

    def entries(self, read_hashed: bool = True) -> Iterator[Entry]:
        """The rows' images. With `read_hashed` False a row that gives its sha256 is not read, and
        needs no path: its entry carries that hash alone (`content_sha256`), for a relabel, which
        only has to know which stored image a row names, and the file may be gone by then."""
        base = posixpath.dirname(self.path)
        real_base = os.path.realpath(base) if self._local else None
        rows = self._rows(needs_path=read_hashed)
        numbered = [(line, row) for line, row in enumerate(rows, start=2) if self._mine(f"{line}")]
        self.total = len(numbered)
        for line, row in numbered:
            name = (row.get("path") or "").strip()
            expected = (row.get("sha256") or "").strip().lower() or None
            if expected and not read_hashed:
                yield Entry(name or f"<line {line}>", (row.get("label") or "").strip() or None, None,
                            content_sha256=expected)
                continue
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
            except Refused as refused:
                yield refused.entry(rel, label, split)
                continue
            except OSError as exc:
                if (refused := file_refusal(exc, self._local)) is None:
                    raise
                yield refused.entry(rel, label, split)
                continue
            yield Entry(rel, label, split, data, expected_sha256=expected)
