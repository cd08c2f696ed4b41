"""Relabelling on the real Parquet store and DuckDB file: a version of copied parts with new labels,
read by training as it reads any version, earlier versions untouched, crash-safe, and the round
trip of a `review export` labels.csv through `cnnpipe ingest --relabel`."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cnn.splits import StoreSplit
from cnnpipe.cli import cli
from cnnpipe.monitoring.review import export_for_review
from cnnpipe.reports.markdown import dataset_markdown, ingest_markdown
from cnnpipe.settings import get_settings
from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from tasks.ingest import record_labels
from tests.imagefactory import encode, jpeg, noise_image, write_class_folders


def ingest(source: Path, name: str = "pets"):
    store = DatasetStore(name)
    with store.lock():
        store.recover()
        return store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))


def relabel(manifest: Path, name: str = "pets", new_classes: tuple[str, ...] = ()):
    store = DatasetStore(name)
    with store.lock():
        store.recover()
        return store.commit(store.stage_relabel(open_source(str(manifest)), new_classes))


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def training_view(dataset_dir: Path) -> dict[str, dict[str, str]]:
    """split -> sha256 of the image -> label, as training reads them (`cnn.splits.StoreSplit`)."""
    seen = {}
    for split in ("train", "val", "test"):
        store_split = StoreSplit.open(dataset_dir, split)
        rows = {}
        for path, group in store_split.row_groups():
            images, labels = store_split.read_group(path, group)
            rows.update({sha(image): store_split.classes[label] for image, label in zip(images, labels)})
        assert len(rows) == store_split.rows  # the manifest's counts agree with the rows read
        seen[split] = rows
    return seen


@pytest.fixture
def two_versions(tmp_path) -> dict[str, Path]:
    """Dataset pets: version 1 from train/ and test/ folders, version 2 adding more train images."""
    first, second = tmp_path / "first", tmp_path / "second"
    write_class_folders(first, {"cat": 4, "dog": 4}, seed=1, split="train")
    write_class_folders(first, {"cat": 2, "dog": 2}, seed=2, split="test")
    write_class_folders(second, {"cat": 3}, seed=3, split="train")
    ingest(first)
    ingest(second)
    return {"first": first, "second": second}


def test_a_relabel_is_a_new_version_that_training_reads_and_earlier_versions_keep_their_labels(two_versions, tmp_path):
    store = DatasetStore("pets")
    before = store.manifest()
    old_view = training_view(store.local_copy())
    v1_bytes = {p.name: p.read_bytes() for p in (store.root / "v000001").iterdir()}
    phashes = store.read_table(["sha256", "phash"])
    phash_before = dict(zip(phashes.column("sha256").to_pylist(), phashes.column("phash").to_pylist()))
    moved_train = sha((two_versions["first"] / "train/cat/0000.jpg").read_bytes())  # stored in version 1
    moved_test = (two_versions["first"] / "test/dog/0001.jpg").read_bytes()
    added_later = sha((two_versions["second"] / "train/cat/0002.jpg").read_bytes())  # stored in version 2
    manifest = write_csv(tmp_path / "fix.csv", [
        {"path": "nowhere/a.jpg", "label": "dog", "sha256": moved_train},  # named by hash: never read
        {"path": "first/test/dog/0001.jpg", "label": "cat", "split": "train"},  # by its bytes; the split stays
        {"path": "second/train/cat/0002.jpg", "label": "dog", "sha256": added_later.upper()},
    ], ["path", "label", "split", "sha256"])

    summary = relabel(manifest)

    assert (summary.version, summary.added, summary.total_rows, summary.rejected) == (3, 0, 15, [])
    split_of = {key: split for split, rows in old_view.items() for key in rows}
    moves = {moved_train: ("cat", "dog"), sha(moved_test): ("dog", "cat"), added_later: ("cat", "dog")}
    assert {(c["sha256"], c["split"], c["old_label"], c["new_label"]) for c in summary.relabelled} == {
        (key, split_of[key], *labels) for key, labels in moves.items()}
    after = store.manifest()
    counts = {split: dict(labels) for split, labels in before["counts"].items()}
    for key, (old, new) in moves.items():
        counts[split_of[key]][old] -= 1
        counts[split_of[key]][new] = counts[split_of[key]].get(new, 0) + 1
    # A class a relabel empties in a split is gone from its counts, as if never there.
    assert after["counts"] == {split: {label: n for label, n in labels.items() if n}
                               for split, labels in counts.items()}
    assert split_of[sha(moved_test)] == "test"
    assert after["num_rows"] == before["num_rows"] == 15 and after["classes"] == ["cat", "dog"]
    # Each part that held a relabelled image is listed as its copy, in its place; nothing else moved.
    assert [f["path"] for f in before["files"]] == ["v000001/part-00000.parquet", "v000002/part-00000.parquet"]
    assert [f["path"] for f in after["files"]] == ["v000003/part-00000.parquet", "v000003/part-00001.parquet"]
    assert after["versions"][-1]["relabelled"] == 3 and after["versions"][-1]["rows"] == 0
    assert "| 3 relabelled |" in dataset_markdown(store, [])  # `cnnpipe datasets show`
    # Two cats became dogs and one dog a cat: the report moves counts, it adds no image.
    report = ingest_markdown(summary)
    assert "relabelled now" in report and "added now" not in report
    assert "| cat |" in report and " -1 |" in report and " +1 |" in report and "| **all** |" in report
    assert after["version_id"] not in {v["version_id"] for v in before["versions"]}

    new_view = training_view(store.local_copy())
    expected = {split: dict(rows) for split, rows in old_view.items()}
    for key, (_, new) in moves.items():
        expected[split_of[key]][key] = new
    assert new_view == expected  # same images in the same splits, the three under their new label
    phashes = store.read_table(["sha256", "phash"])
    assert dict(zip(phashes.column("sha256").to_pylist(), phashes.column("phash").to_pylist())) == phash_before

    # Earlier versions are as they were: their files, and what training pinned to them reads.
    assert {p.name: p.read_bytes() for p in (store.root / "v000001").iterdir()} == v1_bytes
    assert training_view(store.as_of(before["version_id"])) == old_view

    # Without --relabel the conflict rule holds, against the corrected label now.
    again = tmp_path / "again"
    (again / "cat").mkdir(parents=True)
    (again / "cat" / "x.jpg").write_bytes((two_versions["first"] / "train/cat/0000.jpg").read_bytes())
    (again / "dog").mkdir()
    (again / "dog" / "y.jpg").write_bytes((two_versions["first"] / "train/cat/0000.jpg").read_bytes())
    ingested = ingest(again)
    assert [(r.path, r.reason) for r in ingested.rejected] == [("cat/x.jpg", "conflict")]
    assert (ingested.added, ingested.duplicates, ingested.version) == (0, 1, 3)


def test_what_a_relabel_leaves_alone_is_reported_and_a_new_class_needs_naming(two_versions, tmp_path):
    cat = sha((two_versions["first"] / "train/cat/0001.jpg").read_bytes())
    dog = sha((two_versions["first"] / "train/dog/0001.jpg").read_bytes())
    rows = [{"sha256": cat, "label": "lynx"}, {"sha256": dog, "label": "dog"}, {"sha256": "0" * 64, "label": "cat"},
            {"sha256": dog, "label": "cat"}]
    manifest = write_csv(tmp_path / "fix.csv", rows, ["sha256", "label"])  # no path column: hashes alone

    summary = relabel(manifest)
    assert summary.version == 2 and summary.relabelled == []  # nothing changed, no version made
    assert [(r.path, r.reason) for r in summary.skipped] == [("<line 3>", "unchanged"), ("<line 4>", "not_in_dataset")]
    assert sorted((r.path, r.reason) for r in summary.rejected) == [("<line 2>", "unknown_class"),
                                                                    ("<line 5>", "conflict")]
    assert "--new-class lynx" in next(r.detail for r in summary.rejected if r.reason == "unknown_class")

    summary = relabel(write_csv(tmp_path / "new.csv", rows[:1], ["sha256", "label"]), new_classes=("lynx",))
    assert summary.version == 3 and DatasetStore("pets").manifest()["counts"]["train"]["lynx"] == 1


def test_a_stopped_relabel_is_finished_by_a_rerun_and_its_changes_reach_duckdb_once(two_versions, tmp_path,
                                                                                   monkeypatch):
    from cnn import failpoints

    store = DatasetStore("pets")
    changes = {sha((two_versions["first"] / "train/dog/0000.jpg").read_bytes()): "cat",
               sha((two_versions["second"] / "train/cat/0000.jpg").read_bytes()): "dog"}
    manifest = write_csv(tmp_path / "fix.csv", [{"sha256": k, "label": v} for k, v in changes.items()],
                         ["sha256", "label"])
    monkeypatch.setenv("FAILPOINT_ACTION", "raise")
    monkeypatch.setenv("FAILPOINT", "parquet.before_replace")
    monkeypatch.setenv("FAILPOINT_AFTER", "2")  # the first part is copied, the second not
    with pytest.raises(RuntimeError, match="failpoint"):
        relabel(manifest)
    assert store.manifest()["version"] == 2
    [copied] = store.relabel_staging.glob("part-*.parquet")
    inode = copied.stat().st_ino

    failpoints.reset()
    monkeypatch.setenv("FAILPOINT", "store.before_manifest")
    monkeypatch.setenv("FAILPOINT_AFTER", "1")
    with pytest.raises(RuntimeError, match="failpoint"):
        relabel(manifest)  # committed, the manifest not yet written
    assert sorted(p.name for p in (store.root / "v000003").glob("*.parquet")) == ["part-00000.parquet",
                                                                                 "part-00001.parquet"]
    assert (store.root / "v000003" / "part-00000.parquet").stat().st_ino == inode  # kept, not copied again

    monkeypatch.delenv("FAILPOINT")
    rerun = relabel(manifest)
    assert (rerun.version, rerun.relabelled, len(rerun.skipped)) == (3, [], 2)  # done: both unchanged now
    table = store.read_table(["sha256", "label"])
    assert table.num_rows == 15 == len(set(table.column("sha256").to_pylist()))
    labels = dict(zip(*(table.column(c).to_pylist() for c in ("sha256", "label"))))
    assert all(labels[key] == label for key, label in changes.items())

    assert record_labels.fn("pets") == 15
    database = get_settings().predictions_db
    query = "SELECT image_sha256, old_label, new_label, dataset_version, source_uri FROM label_changes ORDER BY 1"
    with duckdb.connect(str(database), read_only=True) as connection:
        recorded = connection.execute(query).fetchall()
        truth = dict(connection.execute("SELECT image_sha256, label FROM ground_truth").fetchall())
    version_id = store.manifest()["version_id"]
    assert recorded == sorted((key, {"cat": "dog", "dog": "cat"}[label], label, version_id, f"file://{manifest}")
                              for key, label in changes.items())
    assert truth == labels
    from cnnpipe.predictions.database import record_label_changes
    assert record_label_changes(database, store.label_changes()) == 0  # a second copy adds nothing


@pytest.mark.usefixtures("prefect_harness")
def test_review_export_labels_csv_round_trips_through_ingest_relabel(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    source = tmp_path / "src"
    write_class_folders(source, {"cat": 3, "dog": 3}, seed=4)
    (source / "cat" / "alpha.png").write_bytes(encode(noise_image(77).convert("RGBA"), "PNG"))  # stored as RGB
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", str(source), "--dataset", "pets", "--workers", "0"]).exit_code == 0
    stored = {row["member_path"]: row for row in
              DatasetStore("pets").read_table(["sha256", "image", "member_path"]).to_pylist()}
    alpha = stored["cat/alpha.png"]
    assert sha(alpha["image"]) != alpha["sha256"]

    # What a person reviewed: two images of the dataset, one of them classified from a folder that is
    # gone since (read back from the store, re-encoded, so its sha256 column is blank), and one new image.
    inbox = tmp_path / "inbox"
    (inbox / "x").mkdir(parents=True)
    (inbox / "x" / "new.jpg").write_bytes(jpeg(999))
    chosen = [("dataset:pets", "cat/0000.jpg", stored["cat/0000.jpg"]["sha256"], "dog"),
              (f"file://{tmp_path / 'gone'}", "cat/alpha.png", alpha["sha256"], "dog"),
              ("dataset:pets", "dog/0000.jpg", stored["dog/0000.jpg"]["sha256"], "dog"),
              (f"file://{inbox}", "x/new.jpg", sha(jpeg(999)), "cat")]
    review = tmp_path / "review"
    export_for_review([{"image_sha256": key, "source_uri": uri, "member_path": member, "model_name": "shapes",
                        "model_version": "1", "label": label, "confidence": 0.4} for uri, member, key, label in chosen],
                      review, get_settings())
    labels_csv = review / "labels.csv"
    with open(labels_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))  # the label column is what the person settled on
    assert [row["sha256"] for row in rows] == [chosen[0][2], "", chosen[2][2], chosen[3][2]]

    result = runner.invoke(cli, ["ingest", str(labels_csv), "--dataset", "pets", "--relabel"])
    assert result.exit_code == 0, result.output
    assert "2 relabelled" in result.output and "Dataset is at version 2" in result.output
    for row, member in zip(rows, ("cat/0000.jpg", "cat/alpha.png")):  # one line each
        assert f"{row['path']} (sha256 {stored[member]['sha256'][:12]}…, " in result.output
        assert result.output.count(row["path"]) == 1
    assert f"{rows[2]['path']}: unchanged (already labelled 'dog')" in result.output
    assert f"{rows[3]['path']}: not_in_dataset (no image of dataset pets has sha256" in result.output
    with duckdb.connect(str(get_settings().predictions_db), read_only=True) as connection:
        changed = connection.execute("SELECT image_sha256, old_label, new_label FROM label_changes").fetchall()
        truth = connection.execute("SELECT count(*) FILTER (label = 'dog') FROM ground_truth").fetchone()[0]
    assert sorted(changed) == sorted([(stored["cat/0000.jpg"]["sha256"], "cat", "dog"),
                                      (alpha["sha256"], "cat", "dog")])
    assert truth == 5

    refused = runner.invoke(cli, ["ingest", str(labels_csv), "--dataset", "ghost", "--relabel"])
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines() == [f"Error: {labels_csv}: no dataset named 'ghost' to relabel; ingest "
                                                   "the images without --relabel first (`cnnpipe datasets` lists the "
                                                   "datasets)"]
    assert pq.read_metadata(DatasetStore("pets").files()[0]).num_rows == 7
