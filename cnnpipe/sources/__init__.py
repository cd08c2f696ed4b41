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

Here `open_source` picks the kind for a URI; `base` holds what every kind shares, and
`folder`, `archives` (tar and zip) and `manifest` one kind each; `images` checks and normalises
one encoded image, for the store's decoders and for classification alike.

May import: base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnpipe.errors import CnnpipeError
from cnnpipe.sources.archives import TAR_SUFFIXES, TarSource, ZipSource
from cnnpipe.sources.base import (DEFAULT_MAX_IMAGE_BYTES, NOT_REGULAR, SPLIT_NAMES, TRANSIENT_ERRORS, Entry,
                                  Refused, Source, UnsafePath, inside, label_and_split, regular_file_size,
                                  safe_relative_path, with_retries)
from cnnpipe.sources.folder import FolderSource
from cnnpipe.sources.manifest import ManifestSource

if TYPE_CHECKING:
    import fsspec

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "NOT_REGULAR", "SPLIT_NAMES", "TAR_SUFFIXES", "TRANSIENT_ERRORS", "Entry",
           "FolderSource", "ManifestSource", "Refused", "Source", "TarSource", "UnsafePath", "ZipSource",
           "canonical_uri", "inside", "label_and_split", "open_source", "regular_file_size", "safe_relative_path",
           "with_retries"]


def open_source(uri: str, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Source:
    """Pick the source kind from what `uri` points at."""
    # Here, not at the top: a decoding process imports `images` alone, and fsspec was half of what
    # that cost (0.12 s a process).
    import fsspec

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
