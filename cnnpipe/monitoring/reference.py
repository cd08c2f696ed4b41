"""Reference profiles on demand: a version registered before monitoring began gets the profile
`fit` now keeps, derived from its weights and its dataset, so that its drift can be measured."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from cnnpipe.models.projections import trained_dataset
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

    mlflow_client = client(settings)
    registered = resolve(mlflow_client, ModelRef(name, version=str(version)))
    found = trained_dataset(registered, settings)
    if found is None:
        log.warning("%s/%s has no reference profile, and without its dataset its drift cannot be measured",
                    name, version)
        return False
    dataset_dir, dataset_version, dataset = found
    with tempfile.TemporaryDirectory(prefix="cnnpipe-profile-") as scratch:
        profile = profile_checkpoint(download_weights(registered, Path(scratch)), dataset_dir, device)
    record_reference_profile(settings.predictions_db, name, str(version), dataset_version, profile)
    if registered.run_id:
        mlflow_client.log_dict(registered.run_id, profile, "monitoring/reference.json")
    log.info("%s/%s: reference profile derived on dataset %s version %s (temperature %.3f)", name, version,
             dataset, dataset_version, profile["temperature"])
    return True
