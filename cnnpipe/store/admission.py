"""What each entry of a source becomes: refused, a duplicate, a conflict, or admitted with a split.

An image is known by its SHA-256 across the whole store: a copy with the same label and split
is a duplicate, one with another is a conflict, and the split of a new image follows from its
hash, so an image never changes split between versions.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

from cnnpipe.errors import CnnpipeError
from cnnpipe.sources import Entry, Source
from cnnpipe.store.decoders import _Pending
from cnnpipe.store.records import Reject, StagedRun

log = logging.getLogger("cnnpipe.store")


@dataclass(frozen=True)
class IngestOptions:
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    resize: int | None = None
    # Decoding processes; None leaves one core to the reader, 0 decodes in this process.
    workers: int | None = None
    # Whether `val_fraction` of a source's train/ images become its validation split, for a
    # source with train/ but no val/ folder (see `split_for_train`). None: decide from the
    # source when staging (`resolve_options`); shards get the decision taken once on the whole.
    carve_val_from_train: bool | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise CnnpipeError("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
        if self.resize is not None and self.resize < 8:
            raise CnnpipeError(f"--resize {self.resize}: expected a size of at least 8 pixels")


def split_for(sha256_hex: str, val_fraction: float, test_fraction: float) -> str:
    """A stable split from the content hash, so an image never changes split between versions."""
    position = int(sha256_hex[:16], 16) / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def split_for_train(sha256_hex: str, val_fraction: float, test_fraction: float) -> str:
    """The split of an image from a train/ folder of a source that has no val/ folder: "val"
    for the same hash band as an unsplit image's val (a share `val_fraction` of them), else
    "train". So an image is val both ways, and never moves out of train into test."""
    return "val" if split_for(sha256_hex, val_fraction, test_fraction) == "val" else "train"


def resolve_options(source: Source, options: IngestOptions) -> IngestOptions:
    """Options with `carve_val_from_train` decided, from the whole source when still None:
    carve when it names train but not val and `val_fraction` is above 0. Take it once per
    source (the parent of its shards), since an archive's member headers are read for it."""
    if options.carve_val_from_train is not None:
        return options
    splits = source.explicit_splits()
    carve = options.val_fraction > 0 and "train" in splits and "val" not in splits
    if carve:
        log.info("no val/ folder in %s: %.0f%% of train/ images (by hash) become the validation split "
                 "(--val-fraction)", source.uri, 100 * options.val_fraction)
    return replace(options, carve_val_from_train=carve)


def reject(run: StagedRun, path: str, reason: str, detail: str) -> None:
    """Record and log one refused input of `run`."""
    refused = Reject(path, reason, detail)
    run.rejected.append(refused)
    log.warning("rejected %s", refused.line(run.source_uri))


def reject_conflict(run: StagedRun, path: str, stored: tuple[str, str]) -> None:
    reject(run, path, "conflict", f"identical image already stored as label {stored[0]!r} in split {stored[1]!r}")


class _ImageIndex:
    """SHA-256 -> (label, split) of every stored image, at about 100 bytes an image.

    Keys are 32-byte digests rather than hex strings, and values small integers into a
    table of (label, split) pairs: a store has few of those and millions of images.
    """

    def __init__(self) -> None:
        self._codes: dict[bytes, int] = {}
        self._pairs: list[tuple[str, str]] = []
        self._pair_codes: dict[tuple[str, str], int] = {}

    def add(self, sha256_hex: str, label: str, split: str) -> None:
        self.add_digest(bytes.fromhex(sha256_hex), label, split)

    def add_digest(self, digest: bytes, label: str, split: str) -> None:
        code = self._pair_codes.get((label, split))
        if code is None:
            code = self._pair_codes[(label, split)] = len(self._pairs)
            self._pairs.append((label, split))
        self._codes[digest] = code

    def get(self, sha256_hex: str) -> tuple[str, str] | None:
        return self.get_digest(bytes.fromhex(sha256_hex))

    def get_digest(self, digest: bytes) -> tuple[str, str] | None:
        code = self._codes.get(digest)
        return None if code is None else self._pairs[code]

    def remove(self, sha256_hex: str) -> None:
        del self._codes[bytes.fromhex(sha256_hex)]


class Admission:
    """Admits the entries of one staging run against the images `known` to the store and run."""

    def __init__(self, run: StagedRun, known: _ImageIndex, options: IngestOptions, unlabelled: str):
        self.run, self.known, self.options, self.unlabelled = run, known, options, unlabelled
        # Images still being validated, with the paths of identical copies seen meanwhile:
        # those copies share the verdict, a duplicate if kept or the same reason if not.
        self.waiting: dict[str, list[str]] = {}

    def admit(self, entry: Entry) -> _Pending | None:
        """The new image of `entry` to validate, or None when it is refused or already known."""
        run, options = self.run, self.options
        if entry.reject_reason:
            reject(run, entry.path, entry.reject_reason, entry.reject_detail)
            return None
        if entry.label is None:
            reject(run, entry.path, "no_label", self.unlabelled)
            return None
        digest = hashlib.sha256(entry.data).digest()
        sha = digest.hex()
        if entry.expected_sha256 and entry.expected_sha256 != sha:
            reject(run, entry.path, "checksum_mismatch",
                   f"manifest says sha256 {entry.expected_sha256[:12]}…, bytes hash to {sha[:12]}…")
            return None
        carved = entry.split == "train" and options.carve_val_from_train
        if carved:
            split = split_for_train(sha, options.val_fraction, options.test_fraction)
        else:
            split = entry.split or split_for(sha, options.val_fraction, options.test_fraction)
        stored = self.known.get_digest(digest)
        if stored is None:
            self.known.add_digest(digest, entry.label, split)
            self.waiting[sha] = []
            return _Pending(entry, sha, entry.label, split)
        # A carved train/ image already stored in train or val (say, before carving existed,
        # or with another --val-fraction) stays where it is: a duplicate, not a conflict.
        if stored == (entry.label, split) or (carved and stored in ((entry.label, "train"), (entry.label, "val"))):
            if sha in self.waiting:
                self.waiting[sha].append(entry.path)
            else:
                run.duplicates += 1
        else:
            reject_conflict(run, entry.path, stored)
        return None

    def settle(self, item: _Pending, refusal: tuple[str, str] | None) -> bool:
        """Take the decoder's verdict on `item` for it and its copies seen meanwhile: True to keep
        it, False when the decoder refused it with `refusal` (reason, detail)."""
        copies = self.waiting.pop(item.sha256)
        if refusal is not None:
            self.known.remove(item.sha256)
            for path in [item.entry.path, *copies]:
                reject(self.run, path, *refusal)
            return False
        self.run.duplicates += len(copies)
        return True
