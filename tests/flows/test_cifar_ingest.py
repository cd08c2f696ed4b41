"""The real data set: CIFAR-10 as 60,000 JPEGs in a tarball, through the ingest flow."""

from __future__ import annotations

import duckdb
import pytest

from cnnpipe.store import DatasetStore
from flows.ingest import ingest
from tests.conftest import CIFAR_TARBALL, needs_cifar

pytestmark = [needs_cifar, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_cifar_tarball_ingests_every_image_once(cnnpipe_home):
    summary = ingest(str(CIFAR_TARBALL), "cifar10")
    assert (summary.added, summary.rejected, summary.version) == (60_000, [], 1)
    manifest = DatasetStore("cifar10").manifest()
    assert manifest["classes"] == ["airplane", "automobile", "bird", "cat", "deer",
                                   "dog", "frog", "horse", "ship", "truck"]
    sizes = {split: sum(c.values()) for split, c in manifest["counts"].items()}
    # No val/ folder: a tenth of train/ becomes the validation split, test/ stays whole.
    assert sizes["train"] + sizes["val"] == 50_000 and sizes["test"] == 10_000
    assert 4_500 < sizes["val"] < 5_500
    glob = f"{cnnpipe_home}/datasets/cifar10/**/*.parquet"
    per_class = duckdb.sql(f"SELECT label, count(*), min(width), max(height) FROM '{glob}' "
                           "WHERE split = 'test' GROUP BY label").fetchall()
    assert sorted(per_class) == [(label, 1000, 32, 32) for label in manifest["classes"]]

    again = ingest(str(CIFAR_TARBALL), "cifar10")
    assert (again.added, again.duplicates, again.version) == (0, 60_000, 1)
