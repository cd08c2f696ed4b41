from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests make no outbound connections, Prefect's telemetry included.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CNNPIPE_SHARED", REPO.parent / "shared"))
CIFAR_TARBALL = SHARED / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def cnnpipe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cnnpipe-home"
    monkeypatch.setenv("CNNPIPE_HOME", str(home))
    from cnnpipe import failpoints

    failpoints.reset()
    for name in ("FAILPOINT", "FAILPOINT_AFTER", "FAILPOINT_ACTION", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return home
