"""Review export: predictions worth a person's look, as image files and a manifest to correct.

`export_for_review` picks a model version's predictions (least confident first, or where its
versions disagree) of images that have no label yet, and writes into a folder:

    images/<sha256[:16]><suffix>   each image, re-read from its source, or from the dataset
                                   store when the source is gone or changed since
    labels.csv                     path,label,confidence,predicted,model,sha256,source_uri,member_path:
                                   the manifest `cnnpipe ingest` reads, its label column pre-filled
                                   with the prediction, so correcting one means editing one cell
    unavailable.csv                the images neither could give back, with the reason

Ingesting `labels.csv` into a dataset then adds the images for the next retraining and their
labels to `ground_truth`, where `production_accuracy` scores the predictions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cnnpipe.base.fsutil import atomic_write_bytes
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import connect_for_writing
from cnnpipe.predictions.records import version_condition
from cnnpipe.predictions.summary import LOW_CONFIDENCE
from cnnpipe.settings import Settings

log = logging.getLogger("cnnpipe.review")

MODES = ("low-confidence", "disagreements")
LABELS_COLUMNS = ["path", "label", "confidence", "predicted", "model", "sha256", "source_uri", "member_path"]
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


@dataclass
class ReviewExport:
    from_source: int = 0
    from_store: int = 0
    unavailable: list[dict] = field(default_factory=list)


def choose(database: Path, model_ref: str, mode: str, limit: int) -> list[dict]:
    """The predictions to review, least confident first: of images with no label in `ground_truth`,
    those under the low-confidence threshold, or those another version of the model labels otherwise."""
    if mode not in MODES:
        raise CnnpipeError(f"review mode {mode!r}: choose one of {', '.join(MODES)}")
    if not database.exists():
        raise CnnpipeError(f"{database}: no predictions yet; run `cnnpipe classify` first")
    confidence = "coalesce(p.calibrated_confidence, p.confidence)"
    if mode == "low-confidence":
        chosen = f"{confidence} < {LOW_CONFIDENCE}"
    else:
        chosen = ("EXISTS (SELECT 1 FROM disagreements d WHERE d.image_sha256 = p.image_sha256 AND "
                  "d.model_name = p.model_name AND p.model_version IN (d.version_a, d.version_b))")
    query = (f"SELECT p.image_sha256, p.source_uri, p.member_path, p.model_name, p.model_version, p.label, "
             f"{confidence} AS confidence FROM predictions p WHERE {version_condition(model_ref, 'p')} AND {chosen} "
             "AND NOT EXISTS (SELECT 1 FROM ground_truth g WHERE g.image_sha256 = p.image_sha256) "
             f"ORDER BY confidence, p.image_sha256 LIMIT {int(limit)}")

    with connect_for_writing(database) as connection:
        cursor = connection.execute(query)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def check_export_folder(folder: Path, settings: Settings) -> None:
    """Refuse, before anything is written, a folder under the home (whichever symlink or `..` leads
    there), where an export would mix with the pipeline's own files, the dataset store's above all;
    a symlinked `images/` or file among those the export writes, which it would write or list through;
    and a folder that holds a `labels.csv` already."""
    home = settings.home.resolve()
    if folder.resolve().is_relative_to(home):
        raise CnnpipeError(f"{folder}: resolves to {folder.resolve()}, inside CNNPIPE_HOME ({home}), where the "
                           "pipeline keeps its own files; export into a folder outside it")
    _refuse_symlinks([folder / "images", folder / "labels.csv", folder / "unavailable.csv"])
    if (folder / "labels.csv").exists():
        raise CnnpipeError(f"{folder / 'labels.csv'} already exists and may hold corrections: ingest it, "
                           "or export into another folder")


def export_for_review(rows: list[dict], folder: Path, settings: Settings) -> ReviewExport:
    """Write the chosen predictions' images, `labels.csv` and `unavailable.csv` into `folder`.
    `labels.csv` comes last: a run that stopped before it can run again and keeps the images it
    wrote, while a folder that has one is refused, since it may hold a person's corrections."""
    check_export_folder(folder, settings)
    export = ReviewExport()
    images = folder / "images"
    found: dict[str, tuple[bytes, str]] = {}
    problems: dict[str, str] = {}
    by_source: defaultdict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[row["source_uri"]].append(row)
    for uri, wanted in by_source.items():
        got, problem = _read_from_source(uri, {row["member_path"]: row["image_sha256"] for row in wanted})
        for row in wanted:
            if row["member_path"] in got:
                found[row["image_sha256"]] = (got[row["member_path"]], _suffix_of(row["member_path"]))
            else:
                problems[row["image_sha256"]] = problem or "no longer in its source"
    export.from_source = len(found)
    from_store = _read_from_store(set(problems), settings)
    export.from_store = len(from_store)
    found.update(from_store)

    listed = []
    to_write: dict[Path, bytes] = {}
    for row in rows:
        sha = row["image_sha256"]
        if sha not in found:
            export.unavailable.append({"sha256": sha, "source_uri": row["source_uri"],
                                       "member_path": row["member_path"],
                                       "reason": f"{problems[sha]}, and in no dataset of the store"})
            continue
        data, suffix = found[sha]
        path = images / f"{sha[:16]}{suffix}"
        to_write[path] = data
        # A copy the store resized no longer hashes to the prediction's image: ingest may not check it.
        same_image = hashlib.sha256(data).hexdigest() == sha
        listed.append({"path": f"images/{path.name}", "label": row["label"], "confidence": f"{row['confidence']:.4f}",
                       "predicted": row["label"], "model": f"{row['model_name']}/{row['model_version']}",
                       "sha256": sha if same_image else "", "source_uri": row["source_uri"],
                       "member_path": row["member_path"]})
    _refuse_symlinks(to_write)  # known only now, and checked before the first write, so a refusal writes nothing
    images.mkdir(parents=True, exist_ok=True)
    for path, data in to_write.items():
        if not path.exists():  # kept from a run that stopped before labels.csv
            atomic_write_bytes(path, data)
    _write_csv(folder / "labels.csv", LABELS_COLUMNS, listed)
    _write_csv(folder / "unavailable.csv", ["sha256", "source_uri", "member_path", "reason"], export.unavailable)
    return export


def _read_from_source(uri: str, wanted: dict[str, str]) -> tuple[dict[str, bytes], str | None]:
    """The wanted members (path -> sha256) of one source that still hold the image that was
    classified, and why the others could not be read."""
    # Imported here: an export whose images all come from the store never opens a source.
    from cnnpipe.sources import FolderSource, ManifestSource, UnsafePath, open_source, safe_relative_path

    if uri.startswith("dataset:"):
        return {}, f"classified from {uri}"
    try:
        source = open_source(uri)
    except CnnpipeError as exc:
        return {}, f"its source is gone ({exc})"
    got: dict[str, bytes] = {}
    changed = False

    def keep(path: str, data: bytes) -> None:
        nonlocal changed
        if hashlib.sha256(data).hexdigest() == wanted[path]:
            got[path] = data
        else:
            changed = True

    if isinstance(source, (FolderSource, ManifestSource)):
        # Read straight from their paths: listing an inbox of millions to find a hundred would not do.
        base = source.path.rstrip("/") if isinstance(source, FolderSource) else posixpath.dirname(source.path)
        for path in wanted:
            try:
                data = source.fs.cat_file(f"{base}/{safe_relative_path(path)}" if base else safe_relative_path(path))
            except (OSError, UnsafePath):
                continue
            keep(path, data)
    else:  # an archive streams: one pass, ending once every wanted member is found
        for entry in source.entries():
            if entry.path in wanted and entry.data is not None:
                keep(entry.path, entry.data)
                if len(got) == len(wanted):
                    break
    return got, ("changed in its source since it was classified" if changed else None)


def _read_from_store(shas: set[str], settings: Settings) -> dict[str, tuple[bytes, str]]:
    """The images with these hashes from any dataset of the store, reading only the row groups that hold one."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cnnpipe.store import DatasetStore, list_datasets

    found: dict[str, tuple[bytes, str]] = {}
    if not shas:
        return found
    for manifest in list_datasets(settings):
        store = DatasetStore(manifest["name"], settings)
        for path in store.files():
            with store.reading(path):
                parquet = pq.ParquetFile(path, filesystem=store.filesystem)
                for group in range(parquet.num_row_groups):
                    hashes = parquet.read_row_group(group, columns=["sha256"]).column("sha256")
                    missing = pa.array(sorted(shas - found.keys()), pa.string())
                    if not pc.any(pc.is_in(hashes, value_set=missing)).as_py():
                        continue
                    for row in parquet.read_row_group(group, columns=["sha256", "image", "format"]).to_pylist():
                        if row["sha256"] in shas:
                            found[row["sha256"]] = (row["image"], _SUFFIXES.get(row["format"] or "", ".img"))
            if len(found) == len(shas):
                return found
    return found


def _suffix_of(member_path: str) -> str:
    suffix = posixpath.splitext(member_path)[1].lower()
    return suffix if 1 < len(suffix) <= 6 and suffix[1:].isalnum() else ".img"


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())


def _refuse_symlinks(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_symlink():
            raise CnnpipeError(f"{path} is a symlink (to {os.readlink(path)}): the export writes real files only, "
                               "never through a link; remove it or export into another folder")
