"""flows.engine: what a flow command no longer pays for, and that it pays for it with nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import prefect.flow_engine

from cnnpipe.store import IngestOptions
from flows.engine import PipelineFlow
from flows.ingest import ingest

# What the ingest command imports before its flow runs; none of these is needed there.
INGEST_PATH = ("import flows.ingest, tasks.ingest, cnnpipe.reports.markdown, cnnpipe.cli\n"
               "flows.ingest.ingest.serialize_parameters({'source': 's', 'new_classes': ('a',)})\n")
UNNEEDED = ("torch", "mlflow", "fastapi", "duckdb", "pandas", "matplotlib", "cleanlab")


def test_the_ingest_path_imports_neither_torch_nor_fastapi_nor_duckdb():
    script = f"import sys\n{INGEST_PATH}print(sorted(m for m in {UNNEEDED!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_plain_parameters_are_sent_as_fastapi_would_send_them():
    from fastapi.encoders import jsonable_encoder

    assert isinstance(ingest, PipelineFlow)
    plain = {"source": "/x", "workers": 0, "val_fraction": 0.1, "resize": None, "relabel": False,
             "new_classes": ("cat", "dog"), "nested": {"a": [1, (2.5, None)]}}
    assert ingest.serialize_parameters(plain) == {key: jsonable_encoder(value) for key, value in plain.items()}
    # Anything else takes Prefect's own path.
    other = {"options": IngestOptions(workers=2), "where": Path("/x")}
    assert ingest.serialize_parameters(other) == {key: jsonable_encoder(value) for key, value in other.items()}


class _Engine:
    """As much of a flow run engine as its heartbeats use."""

    heartbeat_seconds = 30
    flow_run = None
    logger = prefect.flow_engine.get_logger("test")

    def __init__(self):
        self.beats = 0

    def _build_heartbeat_event_template(self):
        return {}, []

    def _emit_flow_run_heartbeat(self, resource, related):
        self.beats += 1


def test_a_flow_run_still_beats_but_ends_without_waiting_for_its_heartbeat_thread():
    engine = _Engine()
    began = time.perf_counter()
    with prefect.flow_engine._send_heartbeats(engine):
        time.sleep(0.05)
    # Prefect's thread sleeps a whole second between checks; joining it waited up to that.
    assert time.perf_counter() - began < 0.5
    assert engine.beats == 1
