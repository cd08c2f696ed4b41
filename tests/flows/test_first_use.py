from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.imagefactory import write_class_folders


@pytest.mark.slow
def test_two_commands_started_together_on_a_fresh_prefect_home_both_succeed(tmp_path):
    # Both migrate Prefect's new database on their first server start unless they take turns.
    write_class_folders(tmp_path / "photos", {"red": 3, "blue": 3})
    environment = {**os.environ, "PREFECT_HOME": str(tmp_path / "fresh-prefect-home")}
    environment.pop("PREFECT_API_URL", None)
    commands = []
    for name in ("first", "second"):
        commands.append(subprocess.Popen(
            [sys.executable, "-m", "cnnpipe.cli", "ingest", str(tmp_path / "photos"), "--dataset", name],
            env={**environment, "CNNPIPE_HOME": str(tmp_path / name)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for command in commands:
        output = command.communicate(timeout=400)[0]
        assert command.returncode == 0, output
