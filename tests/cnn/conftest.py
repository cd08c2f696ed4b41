from __future__ import annotations

from pathlib import Path

import pytest

from cnnpipe.sources import open_source
from cnnpipe.store import DatasetStore, IngestOptions
from cnnpipe.demo import write_demo_images


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> Path:
    """The demo's rendered shapes, ingested once for all training tests (800 images, 4 classes)."""
    import os

    home = tmp_path_factory.mktemp("shapes-home")
    previous = os.environ.get("CNNPIPE_HOME")
    os.environ["CNNPIPE_HOME"] = str(home)
    try:
        folder, archive = write_demo_images(home / "demo")
        store = DatasetStore("shapes")
        for source in (folder, archive):
            with store.lock():
                store.commit(store.stage(open_source(str(source)), IngestOptions(workers=0)))
    finally:
        if previous is not None:
            os.environ["CNNPIPE_HOME"] = previous
    return home / "datasets" / "shapes"
