"""bench/gpu.sh runs on a GPU only when one is lent: its dry run keeps every step of it working meanwhile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = ["train", "time-to-accuracy", "classify", "device-tests"]


@pytest.mark.slow
@pytest.mark.minutes
@pytest.mark.timeout(900)
def test_the_dry_run_runs_every_step_and_prints_one_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "bench/gpu.sh --dry-run" in result.stdout and "| section " in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [step["step"] for step in summary["steps"]] == STEPS
    assert all(step["exit_status"] == 0 for step in summary["steps"])
    assert summary["train"]["rows"][0]["figure"].startswith("model-only")
    figures = [row["figure"] for row in summary["train"]["rows"]]
    assert "model-only alexnet-cifar 128 px, norm=batch" in figures
    assert "decode 320x240 JPEGs to 128 px, CPU threads" in figures
    assert any(figure.startswith("pipeline alexnet-cifar 128 px from 320x240 JPEGs") for figure in figures)
    assert [row["figure"] for row in summary["classify"]["rows"]][1] == "cnnpipe classify into DuckDB"
    assert len(summary["time_to_accuracy"]["runs"]) == 1
    assert summary["device_tests"]["skipped"] >= 1  # no GPU here: the device tests are collected, then skipped


def test_without_wheels_it_stops_at_once_with_one_line(tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "gpu.sh", tmp_path / "bench" / "gpu.sh")
    result = subprocess.run(["bash", str(tmp_path / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["bench/gpu.sh: no wheels in .whl/: run 'make gpu-wheels' where pip can "
                                          "download, and carry .whl"]
    assert result.stdout == ""
