"""Embedding projections on demand: a version registered before embeddings gets the projection
`fit` now saves (`cnn.embeddings`), fitted on the train split of the dataset version it was
trained on, kept in the home's cache and logged to the version's MLflow run."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.models.refs import ModelRef
from cnnpipe.models.registry import client, download_weights, resolve
from cnnpipe.settings import Settings
from cnnpipe.store import DatasetStore

log = logging.getLogger("cnnpipe.projections")


def trained_dataset(registered, settings: Settings) -> tuple[Path, str, str] | None:
    """(folder, version id, dataset name) of the dataset version a registered version was trained on,
    the current version when that one is gone; None, with a warning, when the dataset is gone."""
    name = registered.tags.get("dataset", "")
    store = DatasetStore(name, settings) if name else None
    if store is None or not store.exists():
        log.warning("%s/%s: its dataset %r is gone", registered.name, registered.version, name or None)
        return None
    trained_on = registered.tags.get("dataset_version_id", "")
    try:
        return store.as_of(trained_on), trained_on, name
    except CnnpipeError as exc:
        current = store.manifest()["version_id"]
        log.warning("%s/%s: %s; using the current version %s instead", registered.name, registered.version, exc,
                    current)
        return store.local_copy(), current, name


def ensure_projection(predictor, settings: Settings, device: str = "cpu") -> None:
    """Give a registered version's Predictor its embedding projection, deriving it once for a version
    from before embeddings. Without its dataset it stays without one, and writes no embeddings."""
    if predictor.projection is not None:
        return
    # Only a version without a projection pays for torch and pyarrow here.
    from cnn.checkpoint import load_checkpoint
    from cnn.embeddings import Projection
    from cnn.runs import projection_for
    import torch

    cached = settings.projections_dir / predictor.name / f"{predictor.version}.pt"
    if not cached.exists():
        mlflow_client = client(settings)
        registered = resolve(mlflow_client, ModelRef(predictor.name, version=str(predictor.version)))
        found = trained_dataset(registered, settings)
        if found is None:
            return
        dataset_dir, dataset_version, dataset = found
        with tempfile.TemporaryDirectory(prefix="cnnpipe-projection-") as scratch:
            state = projection_for(download_weights(registered, Path(scratch)), dataset_dir, device)
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        torch.save(state, partial)
        os.replace(partial, cached)
        if registered.run_id:
            mlflow_client.log_artifact(registered.run_id, str(cached), "embedding")
        log.info("%s/%s: embedding projection fitted on dataset %s version %s", predictor.name, predictor.version,
                 dataset, dataset_version)
    predictor.projection = Projection.from_state(load_checkpoint(cached))
