"""Every path and URI the pipeline uses, derived from the environment.

`CNNPIPE_HOME` (default `./.cnnpipe`) is the root of all state. Datasets live under it
unless `CNNPIPE_DATASETS_URL` puts them elsewhere, on any fsspec URL (`s3://bucket/datasets`).
MLflow honours
`MLFLOW_TRACKING_URI` (default: a SQLite file under the home, with artifacts beside it);
Prefect keeps its own rule (ephemeral API unless `PREFECT_API_URL` is set); `cnnpipe server`
keeps its Prefect database under the home, and commands find that server through the files
named here (cnnpipe/server/local_server.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


MLFLOW_EXPERIMENT = "cnn-pipeline"
REGISTERED_MODEL = "cnn-classifier"


@dataclass(frozen=True)
class Settings:
    home: Path
    mlflow_tracking_uri: str
    # A Ray cluster to shard ingestion and classification over; None runs them here.
    ray_address: str | None = None
    # Where the dataset store lives when not under the home: any fsspec URL.
    datasets_location: str | None = None

    @property
    def mlflow_artifacts_dir(self) -> Path | None:
        """Where a local tracking store keeps artifacts; a tracking server decides for itself."""
        return self.home / "mlartifacts" if self.mlflow_tracking_uri.startswith("sqlite:") else None

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def datasets_url(self) -> str:
        return self.datasets_location or str(self.datasets_dir)

    @property
    def dataset_cache_dir(self) -> Path:
        """Local copies of datasets kept on object storage, for training to read."""
        return self.home / "cache" / "datasets"

    @property
    def starting_weights_dir(self) -> Path:
        """Registered versions' weights that runs started from (`--init`), fetched once each."""
        return self.home / "cache" / "starting-weights"

    @property
    def projections_dir(self) -> Path:
        """Embedding projections derived for versions registered before embeddings, one file a version."""
        return self.home / "cache" / "projections"

    @property
    def perceptual_hashes_dir(self) -> Path:
        """Perceptual hashes computed for parts ingested before ingest kept them (`cnnpipe.store.twins`)."""
        return self.home / "cache" / "perceptual-hashes"

    @property
    def staging_dir(self) -> Path:
        # Outside datasets/ so that a glob over a dataset never sees staged parts.
        return self.home / "staging"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def predictions_db(self) -> Path:
        return self.home / "predictions.duckdb"

    @property
    def reports_dir(self) -> Path:
        """Pictures the flows' Prefect artifacts show, kept as files too."""
        return self.home / "reports"

    @property
    def demo_dir(self) -> Path:
        return self.home / "demo"

    @property
    def prefect_home(self) -> Path:
        """PREFECT_HOME of `cnnpipe server`: its database, and Prefect's own PID file of it."""
        return self.home / "prefect"

    @property
    def prefect_server_pid_file(self) -> Path:
        # The name `prefect server start --background` writes and `prefect server stop` reads.
        return self.prefect_home / "server.pid"

    @property
    def server_dir(self) -> Path:
        """What `cnnpipe server` records: its ports, the MLflow UI's and the warm worker's PIDs and logs."""
        return self.home / "server"

    @property
    def server_state_file(self) -> Path:
        return self.server_dir / "server.json"

    @property
    def mlflow_server_pid_file(self) -> Path:
        return self.server_dir / "mlflow.pid"

    @property
    def mlflow_server_log(self) -> Path:
        return self.server_dir / "mlflow.log"

    @property
    def warm_socket(self) -> Path:
        """Where flow commands find the warm worker (`cnnpipe.server.warm`)."""
        return self.server_dir / "warm.sock"

    @property
    def warm_pid_file(self) -> Path:
        return self.server_dir / "warm.pid"

    @property
    def warm_log(self) -> Path:
        return self.server_dir / "warm.log"

    def environment(self) -> dict[str, str]:
        """Variables that make another process (a Ray worker) see the same state and servers."""
        env = {"CNNPIPE_HOME": str(self.home), "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
               "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")}
        if self.datasets_location:
            env["CNNPIPE_DATASETS_URL"] = self.datasets_location
        for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                     "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        return env


def home_of(environ: Mapping[str, str], cwd: str | Path) -> Path:
    """The home that a process with `environ`, working in `cwd`, keeps its state in."""
    return Path(cwd) / Path(environ.get("CNNPIPE_HOME") or ".cnnpipe").expanduser()


def get_settings() -> Settings:
    """Read the environment now, so tests and long-lived servers see changes."""
    home = home_of(os.environ, os.getcwd())
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    return Settings(home=home, mlflow_tracking_uri=tracking, ray_address=os.environ.get("CNNPIPE_RAY_ADDRESS") or None,
                    datasets_location=os.environ.get("CNNPIPE_DATASETS_URL") or None)
