from __future__ import annotations

import tarfile

import pytest

from cnnpipe.store import parts as parts_module
from cnnpipe.errors import CnnpipeError
from cnnpipe.store import DatasetStore
from flows.ingest import ingest
from tests.imagefactory import write_class_folders

pytestmark = pytest.mark.usefixtures("prefect_harness")


def read_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_flow_ingests_reports_and_reruns_as_a_no_op(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 4, "dog": 3})
    first = ingest(str(tmp_path / "src"), "flowpets", workers=0)
    assert (first.added, first.version) == (7, 1)
    again = ingest(str(tmp_path / "src"), "flowpets", workers=0)
    assert (again.added, again.duplicates, again.version) == (0, 7, 1)
    artifacts = read_artifact("ingest-flowpets")
    assert artifacts and "7 added" in artifacts[-1].data or "7 added" in artifacts[0].data


def test_flow_fails_over_the_reject_limit_but_keeps_the_good_images(tmp_path):
    write_class_folders(tmp_path / "src", {"cat": 1})
    for index in range(3):
        (tmp_path / "src" / "cat" / f"bad{index}.jpg").write_text("not an image")
    state = ingest(str(tmp_path / "src"), "mostlybad", workers=0, max_reject_fraction=0.5, return_state=True)
    assert state.is_failed()
    with pytest.raises(CnnpipeError, match="3 of 4 files rejected"):
        state.result()
    assert DatasetStore("mostlybad").manifest()["num_rows"] == 1


def test_a_retried_stage_task_adopts_its_staged_parts_exactly_once(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "src", {"cat": 30})
    monkeypatch.setattr(parts_module, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(parts_module, "PART_ROW_GROUPS", 1)
    # A transient I/O error after three parts were published: Prefect retries the task.
    monkeypatch.setenv("FAILPOINT", "parquet.after_rowgroup")
    monkeypatch.setenv("FAILPOINT_AFTER", "4")
    monkeypatch.setenv("FAILPOINT_ACTION", "eio")
    summary = ingest(str(tmp_path / "src"), "retried", workers=0)
    assert (summary.added, summary.version) == (30, 1)
    table = DatasetStore("retried").read_table(["sha256"])
    assert table.num_rows == 30 == len(set(table.column("sha256").to_pylist()))


def test_a_source_without_val_is_carved_once_alike_locally_and_in_shards(tmp_path, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    import flows.ingest as ingest_module
    from cnnpipe.sources import TarSource

    write_class_folders(tmp_path / "src", {"cat": 12, "dog": 12}, split="train")
    write_class_folders(tmp_path / "src", {"cat": 3}, seed=1, split="test")
    with tarfile.open(tmp_path / "src.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src", arcname=".")
    decisions = []
    original = TarSource.explicit_splits
    monkeypatch.setattr(TarSource, "explicit_splits", lambda self: decisions.append(self.shard) or original(self))
    # The Ray path, with threads for Ray: shards are tasks that get the options the flow resolved.
    monkeypatch.setattr(ingest_module, "ray_task_runner", lambda address: ThreadPoolTaskRunner(max_workers=3))
    monkeypatch.setattr(ingest_module, "run_shards",
                        lambda submit, count: [submit(index).result() for index in range(count)])

    local = ingest(str(tmp_path / "src.tar.gz"), "carvelocal", workers=0, val_fraction=0.3)
    assert decisions == [None]
    sharded = ingest(str(tmp_path / "src.tar.gz"), "carvesharded", workers=0, val_fraction=0.3,
                     ray_address="threads", shards=3)
    assert decisions == [None, None]  # once, by the parent, on the whole archive
    assert (sharded.added, sharded.counts, sharded.val_from_train) == (local.added, local.counts, 0.3) == \
        (27, local.counts, 0.3)
    assert sum(local.counts["val"].values()) > 0 and local.counts["test"] == {"cat": 3}
    artifacts = read_artifact("ingest-carvesharded")
    assert any("30% of its `train/` images" in artifact.data for artifact in artifacts)
    again = ingest(str(tmp_path / "src.tar.gz"), "carvesharded", workers=0, val_fraction=0.3,
                   ray_address="threads", shards=3)
    assert (again.added, again.duplicates, again.rejected, again.version) == (0, 27, [], 1)
