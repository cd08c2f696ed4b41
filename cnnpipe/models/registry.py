"""The model registry: resolving references, safe loading, describing and listing versions.

A registered version carries its figures as tags (`val_top1`, `dataset_version_id`, ...).
The champion gate, promotions and rollbacks, which move the `champion` alias and record every
move in the predictions database, are `cnnpipe.predictions.champions`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpipe.errors import CnnpipeError
from cnnpipe.models.refs import CHAMPION, ModelRef, parse_model_ref, version_id
from cnnpipe.settings import Settings, get_settings

if TYPE_CHECKING:  # the mlflow package takes seconds to import: only the commands that need it pay
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger("cnnpipe.registry")

# Where `cnnpipe.models.tracking.log_model` keeps the weights inside a version's model artifacts.
WEIGHTS_FILE = "weights.pt"
WEIGHTS_ARTIFACT = f"extra_files/{WEIGHTS_FILE}"
GATE_METRIC = "val_top1"
# What MLflow answers for a missing model, version or alias (an unknown alias is a "bad parameter").
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def client(settings: Settings | None = None) -> MlflowClient:
    import mlflow
    from mlflow.tracking import MlflowClient

    settings = settings or get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    return MlflowClient(settings.mlflow_tracking_uri)


def light_client(settings: Settings):
    """The registry through the MLflow UI of `cnnpipe server` when it serves this store, else MlflowClient."""
    # Imported here, not above: most importers of the registry (tracking, the gate) never ask for it.
    from cnnpipe.models.registry_rest import RestRegistry
    from cnnpipe.server.local_server import local_mlflow_url

    url = local_mlflow_url(settings)
    return RestRegistry(url) if url else client(settings)


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in NOT_FOUND


def resolve(mlflow_client: MlflowClient, ref: ModelRef) -> ModelVersion:
    """The one version a reference means now; callers resolve once per run and keep it."""
    try:
        if ref.alias:
            return mlflow_client.get_model_version_by_alias(ref.name, ref.alias)
        return mlflow_client.get_model_version(ref.name, ref.version)
    except Exception as exc:  # MlflowException or RestError, by their shared error codes
        if not _not_found(exc):
            raise
        raise CnnpipeError(f"model {ref}: not in the registry at {mlflow_client.tracking_uri} "
                           "(`cnnpipe models` lists what is there; `cnnpipe train` registers one)") from None


def current_champion(mlflow_client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except Exception as exc:  # MlflowException or RestError
        if _not_found(exc):
            return None
        raise


def latest_version(mlflow_client: MlflowClient, name: str) -> ModelVersion | None:
    """The most recently registered version of `name`, champion or not; None if it has none."""
    found = mlflow_client.search_model_versions(f"name = '{name}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def download_weights(version: ModelVersion, folder: Path) -> Path:
    """The version's `weights.pt`: a state_dict and metadata, never a pickled object."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}/{WEIGHTS_ARTIFACT}", dst_path=str(folder)))
    except (MlflowException, OSError) as exc:
        raise CnnpipeError(f"model {version.name}/{version.version}: cannot fetch {WEIGHTS_ARTIFACT} "
                           f"({str(exc).splitlines()[0]})") from None


def load_predictor(ref: str | ModelRef, device: str = "cpu", batch_size: int = 256):
    """A Predictor for a registered version, loaded with `torch.load(weights_only=True)` only.
    With `cnnpipe server` up, the version is resolved through its MLflow UI and the weights read
    where they lie, without importing MLflow: seconds off every scheduled classify run."""
    from cnn.checkpoint import CheckpointError
    from cnn.predict import Predictor
    from cnnpipe.models.registry_rest import RestRegistry

    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    registry = light_client(get_settings())
    version = resolve(registry, ref)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as scratch:
        path = registry.artifact_file(version, WEIGHTS_ARTIFACT) if isinstance(registry, RestRegistry) else None
        path = path or download_weights(version, Path(scratch))
        try:
            return Predictor(path, device, batch_size, name=version.name, version=version_id(version),
                             run_id=version.run_id)
        except CheckpointError as exc:
            raise CnnpipeError(f"model {version.name} version {version.version}: {exc}") from None


def describe_version(mlflow_client: MlflowClient, version: ModelVersion, tags: dict[str, object]) -> None:
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(version.name, version.version, key, str(value))


def list_versions(name: str | None = None, settings: Settings | None = None) -> list[tuple[ModelVersion, list[str]]]:
    """Every version, newest first, with its aliases (a search does not return them)."""
    mlflow_client = light_client(settings or get_settings())
    models = mlflow_client.search_registered_models()
    if name:
        models = [m for m in models if m.name == name]
        if not models:
            raise CnnpipeError(f"no registered model named {name!r}")
    listed = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        found = mlflow_client.search_model_versions(f"name = '{model.name}'")
        listed += [(v, sorted(aliases.get(version_id(v), []))) for v in sorted(found, key=lambda v: -int(v.version))]
    return listed
