"""The written layout contract of a dataset: its name rule, Parquet schema and options, and manifest.

`manifest.json` is derived from the versions' `version.json` files, never edited in place,
so any reader can rebuild it after a crash and two rebuilds agree. FORMAT, the name of this
layout, lives in `cnn.layout`, the one reader of it.

A version's `counts` say how it changes the images per split and class: what it adds, or for a
relabel (`cnnpipe.store.relabel`), minus one for the label an image leaves and plus one for the
one it takes. A relabel's parts are copies of earlier parts with new labels, each naming the
part it `replaces`: the manifest from that version on lists the copy in the earlier part's
place, so every reader of `files` sees each image once, under its latest label.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from datetime import datetime, timezone

import pyarrow as pa

from cnn.layout import FORMAT
from cnnpipe.base.locations import Folder, ObjectStore

SCHEMA = pa.schema([
    ("sha256", pa.string()),
    ("image", pa.binary()),
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("n_frames", pa.int32()),
    ("label", pa.string()),
    ("split", pa.string()),
    ("source_uri", pa.string()),
    ("member_path", pa.string()),
    ("ingested_at", pa.timestamp("us", tz="UTC")),
    # `cnnpipe.sources.images.perceptual_hash` of the stored pixels; null in parts from before it.
    ("phash", pa.int64()),
])
PARQUET_OPTIONS = {
    # Images are already compressed and hashes do not compress: zstd only where it pays.
    "compression": {name: "zstd" if name in ("member_path", "ingested_at") else "none" for name in SCHEMA.names},
    "use_dictionary": ["format", "label", "split", "source_uri"],
}
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def version_folder(version: int) -> str:
    return f"v{version:06d}"


def chained_version_id(name: str, previous_id: str, content_sum: int) -> str:
    """The id of the version that adds rows summing to `content_sum` (`StagedRun.content_sum`) to
    version `previous_id` of dataset `name`: equal only for the same dataset holding the same images
    under the same labels and splits, so it names one dataset version across machines and runs.
    Ids committed before the name and the labels entered it hashed only the images; they are read
    back from `version.json` as written, never computed again, and later versions chain on them."""
    digest = hashlib.sha256(f"{name}\0{previous_id}\0".encode() + content_sum.to_bytes(32, "big"))
    return digest.hexdigest()[:16]


def _empty_manifest(name: str) -> dict:
    return {"format": FORMAT, "name": name, "version": 0, "version_id": "", "classes": [],
            "counts": {}, "num_rows": 0, "files": [], "versions": []}


def lists_every_version(manifest: dict | None, location: Folder | ObjectStore) -> bool:
    # Comparing the whole list, not the latest number, also catches a version folder
    # that was moved out of the dataset to repair it (see `DatasetStore.repair`).
    return (manifest is not None
            and [version_folder(v["version"]) for v in manifest["versions"]] == location.versions())


def derive_manifest(name: str, location: Folder | ObjectStore, up_to: int | None = None) -> dict:
    """The manifest that the committed versions' `version.json` files add up to, or only those
    up to version `up_to`: the dataset as it was then."""
    manifest = _empty_manifest(name)
    counts: defaultdict[str, Counter] = defaultdict(Counter)
    for directory in location.versions():
        info = location.read_json(f"{directory}/version.json")
        if up_to is not None and info["version"] > up_to:
            break
        listed = {entry["path"]: index for index, entry in enumerate(manifest["files"])}
        for f in info["files"]:
            entry = {"path": f"{directory}/{f['path']}", "rows": f["rows"], "version": info["version"]}
            # In the replaced part's place, so that readers keep the order of the rows.
            if f.get("replaces") in listed:
                manifest["files"][listed[f["replaces"]]] = entry
            else:
                manifest["files"].append(entry)
        listing = {k: info[k] for k in ("version", "version_id", "created_at", "source_uri", "rows")}
        if "label_changes" in info:
            listing["relabelled"] = len(info["label_changes"])
        manifest["versions"].append(listing)
        for split, labels in info["counts"].items():
            counts[split].update(labels)
        manifest["version"], manifest["version_id"] = info["version"], info["version_id"]
    # A class that a relabel emptied is no class of the dataset any more.
    manifest["counts"] = {split: dict(sorted((label, n) for label, n in labels.items() if n > 0))
                          for split, labels in sorted(counts.items()) if +labels}
    manifest["classes"] = sorted({label for labels in manifest["counts"].values() for label in labels})
    manifest["num_rows"] = sum(f["rows"] for f in manifest["files"])
    return manifest


def iso_time(timestamp: float) -> str:
    """A time as the manifest, `version.json` and `rejected.json` write it."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
