"""Reference profiles on demand: a version registered before monitoring began gets the profile
`fit` now keeps, derived from its weights and its dataset, so that its drift can be measured."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.models.refs import ModelRef
from cnnpipe.models.registry import client, download_weights, resolve
from cnnpipe.predictions.records import record_reference_profile, reference_temperature
from cnnpipe.settings import Settings

log = logging.getLogger("cnnpipe.reference")


def ensure_reference_profile(name: str, version: str, settings: Settings, device: str = "cpu") -> bool:
    """Make sure a registered version has its reference profile in the predictions database: one
    registered before monitoring gets it now, from its weights and the dataset version it was
    trained on (the current one when that version is gone), and in its MLflow run. False, with a
    warning, when the dataset is gone."""
    if reference_temperature(settings.predictions_db, name, str(version)) is not None:
        return True
    # Only a version without a profile pays for torch and pyarrow.
    from cnn.runs import profile_checkpoint
    from cnnpipe.store import DatasetStore

    mlflow_client = client(settings)
    registered = resolve(mlflow_client, ModelRef(name, version=str(version)))
    store = DatasetStore(registered.tags.get("dataset", ""), settings) if registered.tags.get("dataset") else None
    if store is None or not store.exists():
        log.warning("%s/%s has no reference profile, and its dataset %r is gone: its drift cannot be measured",
                    name, version, registered.tags.get("dataset"))
        return False
    trained_on = registered.tags.get("dataset_version_id", "")
    try:
        dataset_dir, dataset_version = store.as_of(trained_on), trained_on
    except CnnpipeError as exc:
        dataset_dir, dataset_version = store.local_copy(), store.manifest()["version_id"]
        log.warning("%s/%s: %s; its reference profile is derived on the current version %s instead", name, version,
                    exc, dataset_version)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-profile-") as scratch:
        profile = profile_checkpoint(download_weights(registered, Path(scratch)), dataset_dir, device)
    record_reference_profile(settings.predictions_db, name, str(version), dataset_version, profile)
    if registered.run_id:
        mlflow_client.log_dict(registered.run_id, profile, "monitoring/reference.json")
    log.info("%s/%s: reference profile derived on dataset %s version %s (temperature %.3f)", name, version,
             store.name, dataset_version, profile["temperature"])
    return True
