"""Review export: predictions worth a person's look, as image files and a manifest to correct.

`choose` picks a model version's predictions of images that have no label yet: least confident
first, where its versions disagree, or farthest from the images it was trained for (outliers);
`choose_label_issues` picks the images of a dataset whose label `cnnpipe audit` doubts. Then
`export_for_review` writes into a folder:

    images/<sha256[:16]><suffix>   each image, re-read from its source, or from the dataset
                                   store when the source is gone or changed since
    labels.csv                     path,label,confidence,predicted,model,sha256,source_uri,member_path:
                                   the manifest `cnnpipe ingest` reads, its label column pre-filled
                                   with the prediction (the suggested label for a label issue), so
                                   correcting one means editing one cell; outliers add `distance`,
                                   label issues `split,given_label,label_quality`
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cnn.config import EMBEDDING_DIM
from cnnpipe.base.fsutil import atomic_write_bytes
from cnnpipe.errors import CnnpipeError
from cnnpipe.predictions.database import connect_for_writing
from cnnpipe.predictions.records import version_condition
from cnnpipe.predictions.summary import LOW_CONFIDENCE
from cnnpipe.settings import Settings

log = logging.getLogger("cnnpipe.review")

MODES = ("low-confidence", "disagreements", "outliers", "least-typical")
LABELS_COLUMNS = ["path", "label", "confidence", "predicted", "model", "sha256", "source_uri", "member_path"]
# What each kind of export adds after those columns: how far an outlier lies, and what the audit
# found of a label (its split is kept, so that a corrected image ingested again stays where it was).
OUTLIER_COLUMNS = ("distance",)
LABEL_ISSUE_COLUMNS = ("split", "given_label", "label_quality")
# An image's distance from its version's reference (`reference_embeddings`), as the drift views
# measure a batch's: the root mean square over dimensions of its difference from the reference
# mean in reference standard deviations, over the dimensions the reference images vary along;
# as inner products, 2 s for a million images where a lambda over each element took 13. In double
# precision: for an image near the mean the three terms are large beside their sum, and cancel.
_DISTANCE = f"""sqrt(greatest(0, array_inner_product(CAST(list_transform(e.embedding::DOUBLE[], lambda x: x * x)
    AS DOUBLE[{EMBEDDING_DIM}]), r.weight) - 2 * array_inner_product(e.embedding::DOUBLE[{EMBEDDING_DIM}],
    r.weighted_mean) + r.offset) / r.dimensions)"""
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


@dataclass
class ReviewExport:
    from_source: int = 0
    from_store: int = 0
    unavailable: list[dict] = field(default_factory=list)


def choose(database: Path, model_ref: str | None, mode: str, limit: int,
           classify_runs: str | Sequence[str] | None = None) -> list[dict]:
    """The predictions to review, of images with no label in `ground_truth` (of some classify runs
    only, with `classify_runs`; of every model then, without `model_ref`): those under the
    low-confidence threshold, or those another version of the model labels otherwise, least
    confident first; or outliers, farthest from the version's reference embeddings first, each
    with its `distance`; or least-typical, every one of them, farthest first where the version has
    reference embeddings, then least confident first: how a confidently wrong batch is seen."""
    if mode not in MODES:
        raise CnnpipeError(f"review mode {mode!r}: choose one of {', '.join(MODES)}")
    if not database.exists():
        raise CnnpipeError(f"{database}: no predictions yet; run `cnnpipe classify` first")
    runs = [classify_runs] if isinstance(classify_runs, str) else list(classify_runs or [])
    confidence = "coalesce(p.calibrated_confidence, p.confidence)"
    columns = (f"p.image_sha256, p.source_uri, p.member_path, p.model_name, p.model_version, p.label, "
               f"{confidence} AS confidence")
    conditions = [version_condition(model_ref, "p")] if model_ref else []
    conditions.append("NOT EXISTS (SELECT 1 FROM ground_truth g WHERE g.image_sha256 = p.image_sha256)")
    if runs:
        conditions.append("list_contains($runs, p.classify_run_id)")
    wanted = " AND ".join(conditions)
    if mode in ("outliers", "least-typical"):
        join, kept = ("JOIN", "AND r.dimensions > 0") if mode == "outliers" else ("LEFT JOIN", "")
        query = (f"SELECT {columns}, {_DISTANCE} AS distance FROM predictions p "
                 f"{join} embeddings e USING (image_sha256, model_name, model_version) "
                 f"{join} reference_embeddings r USING (model_name, model_version) "
                 f"WHERE {wanted} {kept} ORDER BY distance DESC NULLS LAST, confidence, p.image_sha256 "
                 f"LIMIT {int(limit)}")
    else:
        chosen = (f"{confidence} < {LOW_CONFIDENCE}" if mode == "low-confidence" else
                  "EXISTS (SELECT 1 FROM disagreements d WHERE d.image_sha256 = p.image_sha256 AND "
                  "d.model_name = p.model_name AND p.model_version IN (d.version_a, d.version_b))")
        query = (f"SELECT {columns} FROM predictions p WHERE {wanted} AND {chosen} "
                 f"ORDER BY confidence, p.image_sha256 LIMIT {int(limit)}")

    with connect_for_writing(database) as connection:
        cursor = connection.execute(query, {"runs": runs} if runs else None)
        names = [column[0] for column in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        if mode == "outliers" and not rows and model_ref:
            _require_embedding_reference(connection, model_ref)
    return rows


def alerting_runs(database: Path, model_ref: str | None = None) -> list[str]:
    """The classify runs whose drift `alert` is on (of one model, with `model_ref`), newest first."""
    if not database.exists():
        return []
    condition = f"AND {version_condition(model_ref, 'd')}" if model_ref else ""
    with connect_for_writing(database) as connection:
        return [row[0] for row in connection.execute(
            f"SELECT d.classify_run_id FROM drift_by_run d LEFT JOIN classify_runs c USING (classify_run_id) "
            f"WHERE d.alert {condition} ORDER BY c.finished_at DESC NULLS LAST, d.classify_run_id").fetchall()]


def _require_embedding_reference(connection, model_ref: str) -> None:
    """Say in one line why a version with embeddings has no outliers: it has no reference to measure them from."""
    lacking = connection.execute(
        f"SELECT e.model_name || '/' || e.model_version FROM embeddings e WHERE {version_condition(model_ref, 'e')} "
        "AND NOT EXISTS (SELECT 1 FROM reference_embeddings r WHERE r.model_name = e.model_name AND "
        "r.model_version = e.model_version AND r.dimensions > 0) LIMIT 1").fetchone()
    if lacking:
        raise CnnpipeError(f"{lacking[0]} has no reference embeddings (it was registered before they were kept), "
                           "so how far its images lie from its training data is not known; review another version")


def choose_label_issues(database: Path, dataset: str, limit: int, settings: Settings) -> list[dict]:
    """The images of `dataset` whose label `cnnpipe audit` doubts (`label_issues`), in its rank
    order, as `export_for_review` takes them: the suggested label in the label column. One whose
    label has changed since the audit (a correction ingested) is left out."""
    from cnnpipe.predictions.similar import dataset_images

    stored = {row["sha256"]: row for row in dataset_images(dataset, settings).to_pylist()}
    if not database.exists():
        raise CnnpipeError(f"{database}: no audit findings yet; run `cnnpipe audit {dataset}` first")
    with connect_for_writing(database) as connection:
        cursor = connection.execute(
            "SELECT image_sha256, split, given_label, suggested_label, label_quality FROM label_issues "
            "WHERE dataset = ? ORDER BY rank NULLS LAST, label_quality, image_sha256", [dataset])
        names = [column[0] for column in cursor.description]
        issues = [dict(zip(names, row)) for row in cursor.fetchall()]
    rows = []
    for issue in issues:
        now = stored.get(issue["image_sha256"])
        if now is not None and now["label"] != issue["given_label"]:
            continue
        rows.append({"image_sha256": issue["image_sha256"], "source_uri": f"dataset:{dataset}",
                     "member_path": now["member_path"] if now else "", "model_name": None, "model_version": None,
                     "label": issue["suggested_label"], "confidence": None, "split": issue["split"],
                     "given_label": issue["given_label"], "label_quality": issue["label_quality"]})
        if len(rows) == limit:
            break
    return rows


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


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


def export_for_review(rows: list[dict], folder: Path, settings: Settings,
                      extra_columns: Iterable[str] = ()) -> ReviewExport:
    """Write the chosen rows' images, `labels.csv` and `unavailable.csv` into `folder`, with
    `extra_columns` of each row after the usual ones in `labels.csv`. A row whose source is a
    dataset of the store (`dataset:NAME`) is read from there. `labels.csv` comes last: a run that
    stopped before it can run again and keeps the images it wrote, while a folder that has one is
    refused, since it may hold a person's corrections."""
    check_export_folder(folder, settings)
    extra_columns = list(extra_columns)
    export = ReviewExport()
    images = folder / "images"
    found: dict[str, tuple[bytes, str]] = {}
    problems: dict[str, str | None] = {}
    by_source: defaultdict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[row["source_uri"]].append(row)
    for uri, wanted in by_source.items():
        if _dataset_of(uri):  # the store is its source
            problems.update((row["image_sha256"], None) for row in wanted)
            continue
        got, problem = _read_from_source(uri, {row["member_path"]: row["image_sha256"] for row in wanted})
        for row in wanted:
            if row["member_path"] in got:
                found[row["image_sha256"]] = (got[row["member_path"]], _suffix_of(row["member_path"]))
            else:
                problems[row["image_sha256"]] = problem or "no longer in its source"
    export.from_source = len(found)
    from_store = _read_from_store(set(problems), settings, [name for uri in by_source if (name := _dataset_of(uri))])
    export.from_store = len(from_store)
    found.update(from_store)

    listed = []
    to_write: dict[Path, bytes] = {}
    for row in rows:
        sha = row["image_sha256"]
        if sha not in found:
            export.unavailable.append({"sha256": sha, "source_uri": row["source_uri"],
                                       "member_path": row["member_path"],
                                       "reason": f"{problems[sha]}, and in no dataset of the store" if problems[sha]
                                       else "no longer in the dataset store"})
            continue
        data, suffix = found[sha]
        path = images / f"{sha[:16]}{suffix}"
        to_write[path] = data
        # A copy the store resized no longer hashes to the prediction's image: ingest may not check it.
        # An image of the store itself keeps its key, which names it to `cnnpipe ingest --relabel`.
        same_image = hashlib.sha256(data).hexdigest() == sha or _dataset_of(row["source_uri"]) is not None
        listed.append({"path": f"images/{path.name}", "label": row["label"],
                       "confidence": _rounded(row["confidence"]), "predicted": row["label"],
                       "model": f"{row['model_name']}/{row['model_version']}" if row["model_name"] else "",
                       "sha256": sha if same_image else "", "source_uri": row["source_uri"],
                       "member_path": row["member_path"],
                       **{column: _rounded(row[column]) if isinstance(row[column], float) else row[column]
                          for column in extra_columns}})
    _refuse_symlinks(to_write)  # known only now, and checked before the first write, so a refusal writes nothing
    images.mkdir(parents=True, exist_ok=True)
    for path, data in to_write.items():
        if not path.exists():  # kept from a run that stopped before labels.csv
            atomic_write_bytes(path, data)
    _write_csv(folder / "labels.csv", LABELS_COLUMNS + extra_columns, listed)
    _write_csv(folder / "unavailable.csv", ["sha256", "source_uri", "member_path", "reason"], export.unavailable)
    return export


def _read_from_source(uri: str, wanted: dict[str, str]) -> tuple[dict[str, bytes], str | None]:
    """The wanted members (path -> sha256) of one source that still hold the image that was
    classified, and why the others could not be read."""
    # Imported here: an export whose images all come from the store never opens a source.
    from cnnpipe.sources import FolderSource, ManifestSource, UnsafePath, open_source, safe_relative_path

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


def _dataset_of(uri: str) -> str | None:
    """The dataset a `dataset:NAME[/SPLIT]` source names; None for any other source."""
    return uri.removeprefix("dataset:").split("/")[0] if uri.startswith("dataset:") else None


def _read_from_store(shas: set[str], settings: Settings, first: list[str] = ()) -> dict[str, tuple[bytes, str]]:
    """The images with these hashes from any dataset of the store, the datasets named in `first`
    searched first, reading only the row groups that hold one."""
    from cnnpipe.store import DatasetStore, list_datasets
    from cnnpipe.store.twins import stored_rows

    found: dict[str, tuple[bytes, str]] = {}
    for manifest in sorted(list_datasets(settings), key=lambda manifest: manifest["name"] not in first):
        if len(found) == len(shas):
            break
        rows = stored_rows(DatasetStore(manifest["name"], settings), shas - found.keys(), ["image", "format"])
        found.update((sha, (row["image"], _SUFFIXES.get(row["format"] or "", ".img"))) for sha, row in rows.items())
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
