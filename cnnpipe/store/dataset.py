"""`DatasetStore`: one dataset of the store, which it reads, locks, recovers and commits versions to."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cnn.failpoints import failpoint
from cnn.layout import MANIFEST
from cnnpipe.base.fsutil import atomic_write_json
from cnnpipe.base.locations import DamagedJson, Folder, location
from cnnpipe.base.locks import file_lock
from cnnpipe.errors import CnnpipeError
from cnnpipe.settings import Settings, get_settings
from cnnpipe.sources import TRANSIENT_ERRORS
from cnnpipe.store import relabel, staging
from cnnpipe.store.format import (DATASET_NAME, SCHEMA, _empty_manifest, chained_version_id, derive_manifest,
                                  iso_time, lists_every_version, version_folder)
from cnnpipe.store.parts import _rows_in, part_problem
from cnnpipe.store.records import DamagedPart, IngestSummary, StagedRun

log = logging.getLogger("cnnpipe.store")


class DatasetStore:
    def __init__(self, name: str, settings: Settings | None = None):
        if not DATASET_NAME.match(name):
            raise CnnpipeError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-'")
        self.name = name
        self.settings = settings or get_settings()
        self.location = location(f"{self.settings.datasets_url.rstrip('/')}/{name}")
        self.staging = self.settings.staging_dir / name / "next"
        self.shards_staging = self.settings.staging_dir / name / "shards"
        self.relabel_staging = self.settings.staging_dir / name / "relabel"

    # ---- reading -------------------------------------------------------------------

    @property
    def root(self) -> Path | str:
        """The dataset's folder, or its URL on object storage."""
        return self.location.path if isinstance(self.location, Folder) else self.location.url

    @property
    def filesystem(self):
        """What pyarrow needs, beside a path of `files()`, to open it."""
        return self.location.filesystem

    def exists(self) -> bool:
        return bool(self.location.versions())

    def latest_version(self) -> int:
        versions = self.location.versions()
        return int(versions[-1][1:]) if versions else 0

    def manifest(self) -> dict:
        """The current manifest; derived afresh if it does not list the committed versions."""
        manifest = self._stored_manifest()
        return manifest if lists_every_version(manifest, self.location) else derive_manifest(self.name, self.location)

    def _stored_manifest(self) -> dict | None:
        """`manifest.json` as stored (None when missing), a damaged one replaced by one rebuilt
        from the versions. Readers repair it too: every manifest written is what the version.json
        files say, so two repairs agree, and one that lags is rebuilt as after a crash."""
        try:
            return self.location.read_json("manifest.json")
        except DamagedJson as exc:
            aside = f"manifest.json.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}"
            self.location.copy("manifest.json", aside)
            manifest = derive_manifest(self.name, self.location)
            self.location.write_json("manifest.json", manifest)
            log.warning("%s; rebuilt it from the version.json files and kept the damaged copy as %s", exc, aside)
            return manifest

    def files(self) -> list[Path | str]:
        return [self.location.file(entry["path"]) for entry in self.manifest()["files"]]

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        files = self.files()
        if not files:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        tables = []
        for path in files:
            with self.reading(path):
                tables.append(pq.read_table(path, columns=columns, filesystem=self.filesystem))
        # Parts from before a column was added lack it: it reads as null there.
        return pa.concat_tables(tables, promote_options="default")

    def verify(self, read_rows: bool = False) -> list[DamagedPart]:
        """The dataset's damaged parts: missing, with a footer that does not read, or holding
        another number of rows than committed. With `read_rows`, also every
        image is read and hashed against its row's sha256, which costs a full read of the dataset."""
        damaged = []
        for entry in self.manifest()["files"]:
            path = self.location.file(entry["path"])
            try:
                problem = part_problem(path, self.filesystem, entry["rows"], read_rows)
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, TRANSIENT_ERRORS):
                    raise
                problem = f"does not read: {_first_line(exc)}"
            if problem:
                damaged.append(DamagedPart(path, entry["version"], problem))
        return damaged

    def repair(self, version: int) -> str:
        """How to repair a damaged part of `version`: the parts of a version are written once, so
        it is restored, or dropped whole and its source ingested again for what it held."""
        listed = next(v for v in self.manifest()["versions"] if v["version"] == version)
        again = f"{listed['source_uri']} --dataset {self.name}" + (" --relabel" if listed.get("relabelled") else "")
        return (f"restore it from a backup, or move {self.location.file(version_folder(version))} out of the "
                f"dataset and run `cnnpipe ingest {again}` to add back what that version held")

    def damaged_part_error(self, path: Path | str, problem: str) -> CnnpipeError:
        """The one-line error of a reader that met a damaged part."""
        version = int(Path(str(path)).parent.name.removeprefix("v"))
        return CnnpipeError(f"{path}: {problem}; {self.repair(version)} "
                            f"(`cnnpipe datasets verify {self.name}` checks every part)")

    @contextmanager
    def reading(self, path: Path | str) -> Iterator[None]:
        """Turns a part of this dataset that does not read into `damaged_part_error`."""
        try:
            yield
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                raise
            raise self.damaged_part_error(path, f"does not read: {_first_line(exc)}") from None

    def rejected(self) -> list[dict]:
        return self.location.read_json("rejected.json") or []

    def local_copy(self) -> Path:
        """A local folder with this dataset's manifest and parts, for training to read: the
        store itself when local, else a cache under the home that fetches only the parts it
        lacks (a committed part never changes)."""
        if isinstance(self.location, Folder):
            # Training reads manifest.json through cnn.layout: a damaged or lagging one is rebuilt first.
            if not lists_every_version(self._stored_manifest(), self.location):
                self.location.write_json("manifest.json", derive_manifest(self.name, self.location))
            return self.location.path
        target = self.settings.dataset_cache_dir / self.name
        manifest = self.manifest()
        for entry in manifest["files"]:
            local = target / entry["path"]
            if local.exists() and _rows_in(local) == entry["rows"]:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".tmp")
            self.filesystem.get_file(self.location.file(entry["path"]), str(partial))
            os.replace(partial, local)
        atomic_write_json(target / "manifest.json", manifest)
        return target

    def as_of(self, version_id: str) -> Path:
        """A local folder that reads as this dataset did at `version_id`, for work that must see
        the images a model was trained on: the local copy itself at the current version, else a
        folder under the cache with that version's manifest and links to its version folders
        (a committed version never changes, so the folder stays right once written)."""
        root, manifest = self.local_copy(), self.manifest()
        if manifest["version_id"] == version_id:
            return root
        number = next((v["version"] for v in manifest["versions"] if v["version_id"] == version_id), None)
        if number is None:
            raise CnnpipeError(f"dataset {self.name} has no version {version_id} (its versions are "
                               f"{', '.join(v['version_id'] for v in manifest['versions'])})")
        pinned = self.settings.dataset_cache_dir / "as-of" / self.name / version_id
        if not (pinned / MANIFEST).exists():
            building = pinned.with_name(f"{version_id}.{os.getpid()}.tmp")
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            for version in manifest["versions"]:
                if version["version"] <= number:
                    (building / version_folder(version["version"])).symlink_to(root / version_folder(version["version"]))
            atomic_write_json(building / MANIFEST, derive_manifest(self.name, self.location, up_to=number))
            shutil.rmtree(pinned, ignore_errors=True)
            os.replace(building, pinned)
        return pinned

    # ---- writing -------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per dataset; a second ingest waits, then finds nothing left to add."""
        with file_lock(self.settings.locks_dir / f"dataset-{self.name}.lock",
                       waiting=f"waiting for another writer of dataset {self.name}"):
            yield

    def recover(self) -> None:
        """Finish what a killed run left: rebuild a lagging manifest, drop half-written files."""
        self.location.discard_debris()
        manifest = self._stored_manifest()
        if self.location.versions() and not lists_every_version(manifest, self.location):
            log.warning("dataset %s: the manifest did not list its versions; rebuilt it", self.name)
            self.location.write_json("manifest.json", derive_manifest(self.name, self.location))
        for directory in [self.staging, self.relabel_staging, *self.shards_staging.glob("*/shard-*")]:
            self.keep_if_current(directory)

    def keep_if_current(self, staging: Path) -> None:
        """Staged parts survive only while the version they were staged on is still the latest."""
        if not staging.exists():
            return
        base = staging / "base.json"
        if not base.exists() or json.loads(base.read_text())["base_version"] != self.latest_version():
            shutil.rmtree(staging)
        else:
            for tmp in staging.glob("*.tmp"):
                tmp.unlink()

    # Staging a source, whole or in shards (staging.py).
    stage = staging.stage
    shard_staging = staging.shard_staging
    stage_shard = staging.stage_shard
    merge_shards = staging.merge_shards
    # Giving stored images other labels, as a version of copied parts (relabel.py).
    stage_relabel = relabel.stage_relabel

    def commit(self, run: StagedRun) -> IngestSummary:
        """Publish the staged parts as the next version, in one rename. Call under `lock()`."""
        staged = self.relabel_staging if run.relabel else self.staging
        version = run.base_version
        if run.rows + run.adopted_rows > 0 or run.label_changes:
            version = run.base_version + 1
            previous_id = self.manifest()["version_id"] if run.base_version else ""
            parts = sorted(staged.glob("part-*.parquet"))
            (staged / "base.json").unlink()
            (staged / "plan.json").unlink(missing_ok=True)
            info = {
                "version": version,
                "version_id": chained_version_id(self.name, previous_id, run.content_sum),
                "created_at": iso_time(time.time()),
                "source_uri": run.source_uri,
                "rows": run.rows + run.adopted_rows,
                "counts": run.added_counts,
                "files": [{"path": p.name, "rows": pq.read_metadata(p).num_rows}
                          | ({"replaces": run.replaces[p.name]} if p.name in run.replaces else {}) for p in parts],
            }
            if run.relabel:
                info["label_changes"] = run.label_changes
            atomic_write_json(staged / "version.json", info)
            self.location.publish(staged, version_folder(version))
            failpoint("store.before_manifest")
            self.location.write_json("manifest.json", derive_manifest(self.name, self.location))
        elif staged.exists():
            shutil.rmtree(staged)
        # Shards staged on the version just replaced; they are committed or stale now.
        shutil.rmtree(self.shards_staging, ignore_errors=True)
        self._record_rejects(run)
        manifest = self.manifest() if self.exists() else _empty_manifest(self.name)
        return IngestSummary(
            dataset=self.name, source_uri=run.source_uri, version=version,
            version_id=manifest["version_id"], added=run.rows + run.adopted_rows,
            duplicates=run.duplicates, rejected=run.rejected, added_counts=run.added_counts,
            counts=manifest["counts"], total_rows=manifest["num_rows"],
            seconds=time.time() - run.started_at, val_from_train=run.val_from_train,
            hidden_skipped=run.hidden_skipped, relabelled=run.label_changes, skipped=run.skipped,
        )

    def label_changes(self) -> list[dict]:
        """Every change of label its relabel versions made, as the `label_changes` table holds them,
        read from their `version.json`."""
        changes = []
        for listed in self.manifest()["versions"]:
            if listed.get("relabelled"):
                info = self.location.read_json(f"{version_folder(listed['version'])}/version.json")
                changes += [{"dataset": self.name, "dataset_version": info["version_id"], "image_sha256": c["sha256"],
                             "old_label": c["old_label"], "new_label": c["new_label"],
                             "changed_at": info["created_at"], "source_uri": info["source_uri"]}
                            for c in info["label_changes"]]
        return changes

    def _record_rejects(self, run: StagedRun) -> None:
        if not run.rejected:
            return
        now = iso_time(time.time())
        merged = {(r["source_uri"], r["path"]): r for r in self.rejected()}
        for reject in run.rejected:
            merged[(run.source_uri, reject.path)] = {"source_uri": run.source_uri, **asdict(reject), "at": now}
        self.location.write_json("rejected.json", sorted(merged.values(), key=lambda r: (r["source_uri"], r["path"])))


def list_datasets(settings: Settings | None = None) -> list[dict]:
    settings = settings or get_settings()
    names = location(settings.datasets_url).children()
    stores = [DatasetStore(name, settings) for name in names if DATASET_NAME.match(name)]
    manifests = []
    for store in stores:
        try:
            if store.exists():
                manifests.append(store.manifest())
        except CnnpipeError as exc:
            # One damaged dataset must not hide the others.
            log.warning("dataset %s is left out of the list: %s", store.name, exc)
    return manifests


def _first_line(exc: Exception) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]
