"""Kill a real `cnnpipe ingest` process with SIGKILL at chosen points, then rerun it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from cnnpipe.store import DatasetStore
from tests.imagefactory import write_class_folders

pytestmark = [pytest.mark.xdist_group("ingest-crash"), pytest.mark.crash, pytest.mark.slow]


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    # More than two 1,024-row groups, so a kill can land between row groups.
    root = tmp_path_factory.mktemp("crash-source")
    write_class_folders(root, {"a": 900, "b": 900, "c": 900}, seed=42)
    return root


def run_cli(args: list[str], api_url: str, **failpoint) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url,
           **{f"FAILPOINT{'_' + k.upper() if k != 'name' else ''}": str(v) for k, v in failpoint.items()}}
    return subprocess.run([sys.executable, "-m", "cnnpipe.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def committed(home: Path) -> list[tuple]:
    return duckdb.sql(f"SELECT sha256 FROM '{home}/datasets/crash/**/*.parquet'").fetchall()


@pytest.mark.parametrize("point, after", [
    ("parquet.after_rowgroup", 2),
    ("parquet.before_replace", 1),
    ("store.before_commit", 1),
    ("store.before_manifest", 1),
])
def test_sigkill_then_rerun_gives_the_exact_rows(point, after, big_source, tmp_path, cnnpipe_home, prefect_harness):
    small = tmp_path / "small"
    write_class_folders(small, {"a": 5, "b": 5}, seed=7)
    assert run_cli(["ingest", str(small), "--dataset", "crash"], prefect_harness).returncode == 0

    killed = run_cli(["ingest", str(big_source), "--dataset", "crash"], prefect_harness,
                     name=point, after=after, action="kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # Readers see the previous version, or the new one if the kill came after its rename.
    rows = committed(cnnpipe_home)
    assert len(rows) in (10, 2710)
    assert len(rows) == (2710 if point == "store.before_manifest" else 10)
    assert DatasetStore("crash").manifest()["num_rows"] == len(rows)

    rerun = run_cli(["ingest", str(big_source), "--dataset", "crash"], prefect_harness)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = committed(cnnpipe_home)
    assert len(rows) == 2710 == len(set(rows))
    manifest = DatasetStore("crash").manifest()
    assert (manifest["version"], manifest["num_rows"]) == (2, 2710)
    assert not list((cnnpipe_home / "staging").rglob("*.tmp"))


def test_file_size_limit_in_a_child_is_a_clear_disk_full_error(tmp_path, cnnpipe_home, prefect_harness):
    # RLIMIT_FSIZE makes writes fail with EFBIG, as a full disk would, in this child only.
    source = tmp_path / "src"
    write_class_folders(source, {"a": 400}, seed=3)
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from cnnpipe.cli import main\n"
        f"sys.argv = ['cnnpipe', 'ingest', {str(source)!r}, '--dataset', 'full', '--workers', '0']\n"
        "main()\n"
    )
    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Error: disk full while writing" in result.stderr and "part-00000.parquet.tmp" in result.stderr
    assert not (cnnpipe_home / "datasets" / "full").exists()
